"""Compile the per-request modules with mypyc, in place: `python -m proxy.build`.

Run by `make` (the install step, and again whenever a compiled source is newer than
the build) and by the wheel build (hatch_build.py). Without a C compiler, Python's
headers or mypyc it says so and leaves the pure-Python modules to run: everything works
that way, only slower. proxy/build_info.py decides at import which build runs and
refuses a compiled build whose sources changed since it was made; `--clean` removes
the extensions and the record (pure Python from then on). `--check` (CI, after the
tests) fails when a C compiler is there but the build a sidecar would run is the
pure-Python one: a compile that failed falls back silently and every test still passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from proxy.build_info import (
    COMPILED,
    RECORD,
    ROOT,
    decide,
    extension_path,
    source_hash,
    source_path,
)

BUILD_DIR = ROOT / "build" / "mypyc"
GROUP = "proxy.hot"  # the shared library: proxy/hot__mypyc.<abi>.so


def missing_toolchain() -> str | None:
    """Why nothing can be compiled here, or None."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        return f"no C compiler ({cc.split()[0]})"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h)"
    try:
        import mypyc  # noqa: F401
        import setuptools  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def clean() -> None:
    RECORD.unlink(missing_ok=True)
    for module in COMPILED:
        while (ext := extension_path(module)) is not None:
            ext.unlink()
    for lib in ROOT.joinpath("proxy").glob("hot__mypyc*"):
        lib.unlink()


def compile_in_place(opt_level: str = "3") -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution

    paths = [str(source_path(m).relative_to(ROOT)) for m in COMPILED]
    hashes = {m: source_hash(source_path(m)) for m in COMPILED}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        extensions = mypycify(
            paths,
            opt_level=opt_level,
            debug_level="0",
            group_name=GROUP,
            target_dir=str(BUILD_DIR.relative_to(ROOT)),
            multi_file=True,
        )
        # The group's headers are written under its package's directory.
        for ext in extensions:
            ext.include_dirs.append(str(BUILD_DIR.relative_to(ROOT) / "proxy"))
        # Not setup(): it would read pyproject.toml, which hatchling builds.
        dist = Distribution({"name": "tether-hot-path", "ext_modules": extensions})
        cmd = dist.get_command_obj("build_ext")
        cmd.inplace = True
        cmd.parallel = os.cpu_count() or 1
        cmd.build_temp = str(BUILD_DIR / "temp")
        dist.run_command("build_ext")
    finally:
        os.chdir(cwd)
    # Written last: without it (an interrupted build) the sources run.
    import mypy.version

    record = {"compiler": f"mypyc {mypy.version.__version__}", "sources": hashes}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def check(root: Path = ROOT, toolchain: str | None = None) -> tuple[bool, str]:
    """Whether the build a sidecar would run here is the one it should: compiled wherever
    it can be built (`toolchain`: what `missing_toolchain()` says, None when there is
    one). TETHER_PURE is not looked at: it is asked for, never a silent fall-back."""
    build = decide({}, root)
    if build.compiled:
        return True, f"proxy.build: the sidecar runs the {build.line()} build"
    if toolchain is not None:
        return True, f"proxy.build: {toolchain}: the pure-Python build runs, as it must here"
    return False, (
        f"proxy.build: a C compiler is here but the sidecar would run the {build.line()} "
        "build; run `python -m proxy.build --require` to see why compiling fails"
    )


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy.build", description=__doc__)
    ap.add_argument("--clean", action="store_true", help="remove the compiled build")
    ap.add_argument("--require", action="store_true", help="fail when it cannot compile")
    ap.add_argument("--force", action="store_true", help="compile even when up to date")
    ap.add_argument(
        "--check",
        action="store_true",
        help="fail when a C compiler is here but the pure-Python build would run",
    )
    args = ap.parse_args()
    if args.check:
        ok, line = check(toolchain=missing_toolchain())
        print(line)
        return 0 if ok else 1
    if not args.clean and not args.force and decide({}).compiled:
        print("proxy.build: the compiled build matches its sources")
        return 0
    clean()
    if args.clean:
        print("proxy.build: compiled build removed; the pure-Python modules run")
        return 0
    why = missing_toolchain()
    if why is not None:
        print(f"proxy.build: {why}: not compiling; the pure-Python modules run (slower)")
        return 1 if args.require else 0
    start = time.monotonic()
    print(f"proxy.build: compiling {len(COMPILED)} per-request modules with mypyc", flush=True)
    try:
        compile_in_place()
    except Exception as e:  # a broken toolchain must not break the install
        clean()
        print(f"proxy.build: compiling failed ({e}); the pure-Python modules run (slower)")
        return 1 if args.require else 0
    print(f"proxy.build: compiled in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
