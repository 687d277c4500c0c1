"""What an idle sidecar does not load (docs/benchmarks.md, idle RSS): py-consul's
synchronous client (`requests`), the HTTP/2 side before an HTTP/2 connection, RE2 before
a policy with a regex. Each check runs in a fresh interpreter, since this test process
has long imported all of them; and the `consul` package loaded by
`proxy/registry_client.py` still gives every caller what its `__init__` gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_sidecar_s_modules_leave_out_what_idle_does_not_use() -> None:
    out = run(
        """
        import sys
        import proxy.sidecar, proxy.listener, proxy.policy, proxy.policy_router
        import proxy.tls, proxy.identity, proxy.admin
        from proxy.registry_client import consul_aio
        client = consul_aio()
        assert hasattr(client, "Consul")
        print(sorted(m for m in ("requests", "urllib3", "h2", "re2", "proxy.h2_downstream")
                     if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_an_http1_request_does_not_load_the_http2_side() -> None:
    out = run(
        """
        import sys
        from proxy.downstream import H2_PREFACE, DownstreamConnection
        assert H2_PREFACE == b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"
        import proxy.h2_downstream as h2d
        assert h2d.PREFACE is H2_PREFACE
        """
    )
    assert out == ""


def test_regexes_load_re2_when_a_rule_has_one() -> None:
    out = run(
        """
        import sys
        from proxy.routing import StringMatch
        StringMatch.of("prefix", "/a")
        print("re2" in sys.modules)
        m = StringMatch.of("regex", "/a/[0-9]+")
        print("re2" in sys.modules)
        from proxy.rule_index import _regex_set
        s = _regex_set()
        s.Add("/b/.*")
        s.Compile()
        assert s.Match("/b/x") == [0] and not s.Match("/c")
        """
    )
    assert out.split() == ["False", "True"]


def test_the_consul_package_completes_for_any_other_caller() -> None:
    out = run(
        """
        import sys
        from proxy.registry_client import consul_aio
        aio = consul_aio()
        import consul
        from consul import Check, ConsulException, Timeout
        assert aio.Consul.__module__ == "consul.aio"
        assert "requests" not in sys.modules
        # Anything else runs the package's own __init__, once.
        from consul import Consul
        assert Consul.__module__ == "consul.std" and "requests" in sys.modules
        assert isinstance(consul.__version__, str) and consul.Check is Check
        assert issubclass(Timeout, ConsulException)
        try:
            consul.no_such_name
        except AttributeError:
            print("ok")
        """
    )
    assert out.strip() == "ok"
