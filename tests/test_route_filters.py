"""Route rules' L7 fields: the schema's checks (field path and line), their compiled
forms (proxy/route_filters.py, proxy/mirror.py) with injected clocks and random sources,
and the router's answers through the real compiled table (proxy/policy.py)."""

from __future__ import annotations

import random

import pytest

from controlplane.validation import validate
from proxy.local_reply import retry_after
from proxy.mirror import shadow_host
from proxy.policy import compile_table
from proxy.route_filters import BucketStore, Fault, Redirect, Rewrite, TokenBuckets
from proxy.routing import StringMatch
from wire.resources import Resource

HEAD = "apiVersion: tether.dev/v1alpha1\nkind: Route\nmetadata: {name: orders}\nspec:\n  rules:\n"


def problems(rule_yaml: str) -> dict[str, tuple[str, int | None]]:
    out = validate([("r.yaml", HEAD + rule_yaml)])
    return {p.path: (p.message, p.line) for p in out.problems if p.is_error}


def test_a_rule_with_every_l7_field_is_valid() -> None:
    assert (
        problems(
            "    - match: {path: {prefix: /api}}\n"
            "      fault:\n"
            "        delay: {fixed: 50ms, percentage: 10}\n"
            "        abort: {status: 503, percentage: 5}\n"
            "        headers: [{name: x-chaos, exact: 'on'}]\n"
            "      rewrite: {prefix: /v2, host: orders-v2}\n"
            "      rateLimit:\n"
            "        {requests: 10, interval: 1s, burst: 20, key: header, header: x-user}\n"
            "      mirror: {service: orders-next, percentage: 25, maxBodyBytes: 1024}\n"
        )
        == {}
    )


@pytest.mark.parametrize(
    ("rule", "path", "message", "line"),
    [
        ("    - fault: {}\n", "spec.rules[0].fault", "needs 'delay', 'abort'", 6),
        (
            "    - fault: {abort: {status: 700}}\n",
            "spec.rules[0].fault.abort.status",
            "out of range 200-599",
            6,
        ),
        (
            "    - fault:\n        delay: {fixed: 1s, percentage: 101}\n",
            "spec.rules[0].fault.delay.percentage",
            "out of range 0-100",
            7,
        ),
        (
            "    - rewrite: {prefix: /v2}\n",
            "spec.rules[0].rewrite.prefix",
            "needs the rule's match.path.prefix",
            6,
        ),
        (
            "    - rewrite:\n        regex: {pattern: '(?=x)', substitution: /}\n",
            "spec.rules[0].rewrite.regex.pattern",
            "RE2",
            7,
        ),
        ("    - redirect: {status: 300}\n", "spec.rules[0].redirect.status", "not one of", 6),
        (
            "    - redirect: {host: example.com}\n      mirror: {service: b}\n",
            "spec.rules[0].redirect",
            "cannot have 'mirror'",
            6,
        ),
        (
            "    - rateLimit: {requests: 5, key: caller}\n",
            "spec.rules[0].rateLimit.key",
            "inbound sidecar only",
            6,
        ),
        (
            "    - rateLimit: {requests: 5, key: header}\n",
            "spec.rules[0].rateLimit",
            "needs 'header'",
            6,
        ),
        (
            "    - rateLimit: {requests: 0}\n",
            "spec.rules[0].rateLimit.requests",
            "between 1 and",
            6,
        ),
        (
            "    - mirror: {service: Bad_Name}\n",
            "spec.rules[0].mirror.service",
            "invalid service name",
            6,
        ),
        (
            "    - faultInjection: {}\n",
            "spec.rules[0].faultInjection",
            "not supported yet",
            6,
        ),
    ],
)
def test_bad_l7_fields_name_the_field_and_line(
    rule: str, path: str, message: str, line: int
) -> None:
    got = problems(rule)
    assert path in got, got
    assert message in got[path][0]
    assert got[path][1] == line


def test_token_buckets_refill_at_the_rate_and_say_when() -> None:
    tb = TokenBuckets(requests=2, interval=1.0, burst=2, max_keys=10)
    assert [tb.take("", 100.0) for _ in range(2)] == [0.0, 0.0]
    wait = tb.take("", 100.0)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == b"1"
    assert tb.take("", 100.25) == pytest.approx(0.25)  # half a token came back
    assert tb.take("", 100.5) == 0.0
    assert tb.take("", 110.0) == 0.0  # refilled, capped at the burst
    assert tb.take("", 110.0) == 0.0
    assert tb.take("", 110.0) > 0.0


def test_token_buckets_are_bounded_by_least_recent_use() -> None:
    tb = TokenBuckets(requests=1, interval=60.0, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert tb.take(key, 0.0) == 0.0
    assert tb.take("a", 0.0) > 0.0  # a is used again: b is now the oldest
    for i in range(10_000):
        tb.take(f"flood-{i}", 1.0)
    assert len(tb) == 3
    assert tb.take("a", 2.0) == 0.0  # evicted: starts full again


def test_bucket_store_keeps_unchanged_rules_buckets_across_snapshots() -> None:
    store = BucketStore()
    made: list[TokenBuckets] = []

    def make() -> TokenBuckets:
        made.append(TokenBuckets(1, 1.0, 1, 10))
        return made[-1]

    first = store.get("k", make)
    store.commit()
    assert store.get("k", make) is first and len(made) == 1
    store.discard()  # a snapshot that failed to apply changes nothing
    assert store.live == {"k": first}
    store.get("other", make)
    store.commit()
    assert set(store.live) == {"other"}  # a rule that went takes its buckets along


def test_fault_draws_follow_the_percentages_and_the_header_condition() -> None:
    rng = random.Random(7)
    fault = Fault(
        headers=(("x-chaos", StringMatch.of("exact", "on")),),
        delay=0.2,
        delay_fraction=50.0,
        abort_status=503,
        abort_fraction=20.0,
    )
    assert fault.draw({}, rng) == (0, 0.0)
    draws = [fault.draw({"x-chaos": "on"}, rng) for _ in range(10_000)]
    aborts = sum(1 for status, _ in draws if status == 503)
    delays = sum(1 for _, d in draws if d == 0.2)
    # 20% aborts; of the rest, half delayed (40% of all): 5 standard deviations.
    assert abs(aborts - 2000) < 5 * (10_000 * 0.2 * 0.8) ** 0.5
    assert abs(delays - 4000) < 5 * (10_000 * 0.4 * 0.6) ** 0.5


def test_rewrites_keep_the_query_and_fold_slashes() -> None:
    assert Rewrite(prefix="/api", replacement="/v2").path("/api/items?x=1") == "/v2/items?x=1"
    assert Rewrite(prefix="/api/", replacement="/").path("/api/items") == "/items"
    assert Rewrite(prefix="/api", replacement="/").path("/api/items") == "/items"
    regex = StringMatch.of("regex", "^/users/([0-9]+)/profile$").pattern
    rw = Rewrite(pattern=regex, substitution=r"/profiles/\1")
    assert rw.path("/users/42/profile?full=1") == "/profiles/42?full=1"
    assert rw.path("/other") == "/other"
    assert Rewrite(host="b").path("/x") is None


def test_redirect_locations() -> None:
    assert Redirect(301, scheme="https").location("orders", "/a?b=1") == "https://orders/a?b=1"
    assert Redirect(302, host="new", port=8443, path="/x").location("o:80", "/a") == (
        "http://new:8443/x"
    )
    assert Redirect(308, port=81).location("orders:80", "/a") == "http://orders:81/a"


def test_shadow_host_suffix_goes_before_the_port() -> None:
    assert shadow_host(b"orders") == b"orders-shadow"
    assert shadow_host(b"orders:8080") == b"orders-shadow:8080"


def test_compiled_rules_carry_their_filters_and_read_their_headers() -> None:
    docs = [
        {
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "Route",
            "metadata": {"name": "orders"},
            "spec": {
                "rules": [
                    {
                        "match": {"path": {"prefix": "/limited"}},
                        "rateLimit": {"requests": 1, "key": "header", "header": "X-User"},
                    },
                    {
                        "fault": {
                            "abort": {"status": 500},
                            "headers": [{"name": "X-Chaos", "present": True}],
                        }
                    },
                ]
            },
        }
    ]
    resources = [Resource.from_dict(d) for d in docs]
    store = BucketStore()
    table, _ = compile_table(resources, 1, "h", store)
    store.commit()
    pol = table.policy("default", "orders")
    assert pol is not None
    assert pol.header_names == {b"x-user", b"x-chaos"}
    limited, chaos = pol.rules
    assert limited.filters is not None and limited.filters.outbound_limit is not None
    assert chaos.filters is not None and chaos.filters.fault is not None
    # The same snapshot again keeps the bucket (its count survives a re-push).
    table2, _ = compile_table(resources, 2, "h2", store)
    pol2 = table2.policy("default", "orders")
    assert pol2 is not None and pol2.rules[0].filters is not None
    assert pol2.rules[0].filters.rate_limit is not None
    assert limited.filters.rate_limit is not None
    assert pol2.rules[0].filters.rate_limit.buckets is limited.filters.rate_limit.buckets


def test_a_mirror_subset_must_be_defined_by_the_shadows_split() -> None:
    text = HEAD + "    - mirror: {service: search-next, subset: canary}\n"
    got = {p.path: p for p in validate([("r.yaml", text)]).problems if p.is_error}
    p = got["spec.rules[0].mirror.subset"]
    assert "not defined by a TrafficSplit default/search-next" in p.message and p.line == 6


def test_mirror_draws_follow_the_percentage() -> None:
    from proxy.route_filters import Mirror

    rng = random.Random(11)
    m = Mirror("shadow", "default", None, 25.0, 1024)
    hits = sum(m.draw(rng) for _ in range(10_000))
    assert abs(hits - 2500) < 5 * (10_000 * 0.25 * 0.75) ** 0.5  # 5 standard deviations
    assert all(Mirror("s", "d", None, 100.0, 0).draw(rng) for _ in range(100))
    assert not any(Mirror("s", "d", None, 0.0, 0).draw(rng) for _ in range(100))


def test_l7_fields_on_service_defaults_say_where_they_belong() -> None:
    text = (
        "apiVersion: tether.dev/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: orders}\n"
        "spec:\n  rateLimit: {requests: 1}\n"
    )
    got = {p.path: p for p in validate([("sd.yaml", text)]).problems if p.is_error}
    p = got["spec.rateLimit"]
    assert "belongs to a Route rule's 'rateLimit'" in p.message and p.line == 5
