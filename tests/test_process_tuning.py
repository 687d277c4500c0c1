"""`proxy.listener.keep_reads_on_heap`: once a sidecar has settled, blocks of uvloop's TLS
read size (256 KiB, shrunk to what was read) come from the heap, where glibc's initial
threshold (128 KiB) gives each one an mmap of its own when the heap has no room
(glibc's `mallinfo2` counts the mapped blocks)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

PROBE = """
import ctypes
from proxy.listener import keep_reads_on_heap

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped(n):
    \"\"\"How many of `n` 300 KiB objects held at once got an mmap of their own (12 MB:
    more than the heap has free, so glibc must grow the heap or map).\"\"\"
    before = libc.mallinfo2().hblks
    held = [bytes(300 * 1024) for _ in range(n)]
    return libc.mallinfo2().hblks - before

libc.mallopt(-3, 128 * 1024)  # glibc's initial mmap threshold, whatever start-up did
print(mapped(40))
print(keep_reads_on_heap())
print(mapped(40))
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_large_reads_stay_on_the_heap() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    before, applied, after = done.stdout.split()
    assert applied == "True"
    assert int(before) >= 30  # an mmap each (the heap's free space takes a few)
    assert int(after) == 0
