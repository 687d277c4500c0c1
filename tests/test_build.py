"""The compiled build of the per-request modules and its guard (proxy/build_info.py).

An extension module beside its `.py` shadows it at import: these tests show that a
build whose sources changed since it was compiled (or TETHER_PURE=1) runs the sources,
all or nothing, and that the suite itself runs the compiled build wherever it was built.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import build_info
from proxy.build import check, missing_toolchain
from proxy.build_info import COMPILED, Build, decide, source_hash, source_path

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_tree(root: Path, *, stale: str | None = None, garbage: bool = True) -> Path:
    """A `proxy` package under `root` with every compiled module as a small source, an
    "extension" beside each (garbage bytes: importing one fails loudly) and a build
    record; `stale` names a module whose source changes after the record was written."""
    shutil.copy(ROOT / "proxy" / "build_info.py", root / "build_info.py.tmp")
    for module in COMPILED:
        src = source_path(module, root)
        src.parent.mkdir(parents=True, exist_ok=True)
        for pkg in src.parents:
            if pkg == root:
                break
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text("")
        src.write_text(f"WHO = {module!r}\n")
        if garbage:
            src.with_name(src.stem + SUFFIX).write_bytes(b"not an extension module")
    (root / "proxy" / "__init__.py").write_text("from proxy import build_info as build_info\n")
    (root / "build_info.py.tmp").rename(root / "proxy" / "build_info.py")
    record = {
        "compiler": "mypyc test",
        "sources": {m: source_hash(source_path(m, root)) for m in COMPILED},
    }
    (root / "proxy" / "_compiled.json").write_text(json.dumps(record))
    if stale is not None:
        path = source_path(stale, root)
        path.write_text(path.read_text() + "EDITED = True\n")
    return root


def run_in(root: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TETHER_PURE"}
    environ |= {"PYTHONPATH": str(root), **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        cwd=root,
        timeout=60,
    )


def test_a_build_that_matches_its_sources_is_chosen(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    build = decide({}, tmp_path)
    assert build == Build(True, f"mypyc test, {len(COMPILED)} modules")
    assert build.line().startswith("compiled (mypyc test")


def test_a_source_changed_since_the_build_runs_pure_and_says_which(tmp_path: Path) -> None:
    fake_tree(tmp_path, stale="proxy.exchange")
    build = decide({}, tmp_path)
    assert not build.compiled
    assert build.detail == "proxy/exchange.py changed since it was compiled; run make to rebuild"


def test_tether_pure_a_missing_extension_or_record_run_pure(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    assert decide({"TETHER_PURE": "1"}, tmp_path) == Build(False, "TETHER_PURE is set")
    assert decide({"TETHER_PURE": "0"}, tmp_path).compiled
    source_path("proxy.pool", tmp_path).with_name("pool" + SUFFIX).unlink()
    assert decide({}, tmp_path).detail.startswith("no compiled extension for proxy.pool")
    (tmp_path / "proxy" / "_compiled.json").write_text("{not json")
    assert decide({}, tmp_path).detail.startswith("unreadable build record")
    (tmp_path / "proxy" / "_compiled.json").unlink()
    assert decide({}, tmp_path).detail.startswith("not compiled")


def test_ci_check_fails_a_silent_fall_back_only_where_a_compiler_is(tmp_path: Path) -> None:
    """`python -m proxy.build --check` (.ci/run): a stale or failed build is an error
    where a C compiler is there, the expected build where none is."""
    fake_tree(tmp_path)
    ok, line = check(tmp_path, toolchain=None)
    assert ok and "runs the compiled (mypyc test" in line
    (tmp_path / "proxy" / "_compiled.json").unlink()  # as a failed compile leaves it
    ok, line = check(tmp_path, toolchain=None)
    assert not ok and "would run the pure (not compiled" in line
    ok, line = check(tmp_path, toolchain="no C compiler (cc)")
    assert ok and line.startswith("proxy.build: no C compiler (cc): the pure-Python build")
    fake_tree(tmp_path, stale="proxy.pool")
    ok, line = check(tmp_path, toolchain=None)
    assert not ok and "proxy/pool.py changed since it was compiled" in line


def test_ci_check_on_this_tree_follows_the_real_build() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy.build", "--check"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=dict(os.environ, TETHER_PURE="1"),  # asked-for pure is not looked at
    )  # fmt: skip
    why = missing_toolchain()
    expect_ok = why is not None or decide({}).compiled
    assert (out.returncode == 0) == expect_ok, out.stdout + out.stderr
    assert out.stdout.startswith("proxy.build: ")


def test_the_guard_loads_every_module_from_its_source_when_stale(tmp_path: Path) -> None:
    """With a stale record the (garbage) extensions beside the sources are never loaded;
    with a matching one they are, which is what the guard is there for."""
    fake_tree(tmp_path, stale="proxy.heads")
    code = (
        "import proxy, proxy.exchange, proxy.balance.p2c\n"
        "print(proxy.build_info.BUILD.line())\n"
        "print(proxy.exchange.WHO, proxy.exchange.__file__.endswith('.py'))\n"
        "print(proxy.balance.p2c.WHO, proxy.balance.p2c.__file__.endswith('.py'))\n"
    )
    out = run_in(tmp_path, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "pure (proxy/heads.py changed since it was compiled; run make to rebuild)",
        "proxy.exchange True",
        "proxy.balance.p2c True",
    ]
    assert run_in(tmp_path, code, TETHER_PURE="1").stdout.startswith("pure (TETHER_PURE is set)")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fake_tree(fresh)
    out = run_in(fresh, code)
    assert out.returncode != 0 and "ImportError" in out.stderr  # the extension shadowed it


def test_the_suite_runs_the_compiled_build_where_it_can_be_built() -> None:
    build = build_info.BUILD
    import proxy.exchange

    loaded_from = Path(proxy.exchange.__file__ or "")
    if os.environ.get("TETHER_PURE", "") not in ("", "0"):
        assert build == Build(False, "TETHER_PURE is set")
        assert loaded_from.suffix == ".py"
        return
    why = missing_toolchain()
    if why is not None:
        pytest.skip(f"nothing can be compiled here: {why}")
    assert build.compiled, f"the pure-Python modules run: {build.detail}"
    assert loaded_from.name.endswith(SUFFIX)


def test_a_real_compiled_build_edited_afterwards_runs_the_edited_source(tmp_path: Path) -> None:
    """The real extensions, copied with their sources; one source edited after."""
    if not build_info.BUILD.compiled:
        pytest.skip(f"no compiled build here: {build_info.BUILD.detail}")
    shutil.copytree(
        ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = "import proxy.forwarding as f, proxy.build_info as b; print(b.BUILD.name, f.__file__)"
    compiled = run_in(tmp_path, code)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout.split()[0] == "compiled" and compiled.stdout.strip().endswith(SUFFIX)
    edited = source_path("proxy.forwarding", tmp_path)
    edited.write_text(edited.read_text() + "\nEDITED = True\n")
    out = run_in(tmp_path, code + "; print(f.EDITED)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pure", str(edited), "True"]
