"""A new user's first run, from a fresh copy of the repository in a fresh venv.

Marked `install`: these build a venv from the package index (network) and take a
minute or two; they share one venv. The README's set-up is `make up` / `make test`,
whose first step (the same for both) creates `.venv` and installs the project; then
`make up` runs the demo mesh. A normal install is a wheel: the same venv then gets the
built wheel instead of the editable install, and `tether up` run outside the source
tree must still find and apply the demo's policies (shipped in the package).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.sidecar_harness import poll

pytestmark = [pytest.mark.install, pytest.mark.slow, pytest.mark.timeout(900)]

# Each port 0 (any free one): the well-known 8500 and 15010 may be someone else's.
UP_FLAGS = "--registry-port 0 --controlplane-port 0 --no-view --drain-seconds 1"


def fresh_copy(dest: Path) -> None:
    """What a clone of this working tree holds: tracked and new files, not ignored ones
    (no .venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(the copy, the output of its set-up step: `make .venv/.installed`)."""
    dest = tmp_path_factory.mktemp("fresh") / "tether"
    fresh_copy(dest)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        ["make", ".venv/.installed"], cwd=dest, env=env, capture_output=True, text=True,
        timeout=800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    yield dest, done.stdout
    shutil.rmtree(dest, ignore_errors=True)


def run_until_ready(argv: list[str], cwd: Path, log: Path) -> tuple[int, str]:
    """Start `tether up` (directly or through make), wait for ready, Ctrl-C it: its exit
    status and output."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        # `make up` on a fresh copy first compiles the per-request modules (mypyc): on a
        # slow or busy machine that alone can take minutes, so the bound is generous.
        poll(
            lambda: "tether up: ready" in log.read_text() or proc.poll() is not None,
            480,
            "tether up ready",
            interval=0.2,
        )
        assert proc.poll() is None, log.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return code, log.read_text()


def test_quick_start_from_a_fresh_copy(fresh: tuple[Path, str], tmp_path: Path) -> None:
    dest, setup = fresh
    # One line per step while the venv is made (pip's own output is quiet).
    steps = re.findall(r"^make: \[(\d)/3\]", setup, re.M)
    assert steps == ["1", "2", "3"] and "make: .venv is ready" in setup, setup
    # `make test`'s first step is that same one: nothing left to do for it.
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=dest).returncode == 0
    code, out = run_until_ready(["make", "up", f"UP_FLAGS={UP_FLAGS}"], dest, tmp_path / "up.log")
    assert "policies | trafficsplit default/orders created" in out, out
    # make reports the interrupt as its own failure; tether up itself stopped cleanly.
    assert "tether up: stopped" in out and code in (0, 2, 130, -signal.SIGINT), (code, out)


def test_a_wheel_install_runs_the_demo_with_its_policies(
    fresh: tuple[Path, str], tmp_path: Path
) -> None:
    dest, _ = fresh
    py = dest / ".venv" / "bin" / "python"
    dist = tmp_path / "dist"
    subprocess.run(
        [py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, dest], check=True, timeout=600
    )
    (wheel,) = dist.glob("tether-*.whl")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel],
        check=True, timeout=600,
    )  # fmt: skip
    # Outside the source tree: what is imported is the installed package.
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run(
        [py, "-c", "import tether.up as u; print(u.DEMO_POLICIES)"],
        cwd=away, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert "site-packages" in where and sorted(p.name for p in Path(where).glob("*.yaml")) == [
        "orders.yaml",
        "services.yaml",
    ]
    tether = dest / ".venv" / "bin" / "tether"
    code, out = run_until_ready([str(tether), "up", *UP_FLAGS.split()], away, tmp_path / "up.log")
    assert code == 0 and "not applied" not in out, out
    assert "policies | trafficsplit default/orders created" in out, out
    assert "(6 from policies applied; config version 1;" in out, out
