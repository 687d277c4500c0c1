"""Where a realistic request head's parsing cost goes: llhttp's per-field callbacks or not.

httptools calls back into Python once per field name and once per value (and the
codec's `on_header` runs for each field). This compares, per head, for the realistic
heads of `bench.hop_bench --realistic` (eight field lines, each head its own):

- `codec`: `RequestCodec.feed` as the sidecar runs it (no head cache, so llhttp parses
  every head; the per-field callbacks and the codec's field handling included);
- `llhttp, no field callbacks`: the same bytes through llhttp with a protocol that has
  no `on_header` (httptools then installs no per-field callback: llhttp still checks
  the whole head), i.e. what a whole-head parse in C would leave;
- `split`: what splitting the checked head's field lines takes in the per-request
  modules (`heads._field_list`, compiled where the build is).

What making the heads costs the script itself is counted apart and subtracted.

    .venv/bin/python -m bench.parse_bench [--instructions] [--count 20000]

`--instructions` counts with callgrind (two runs, the difference per head, as in
bench/hop_bench.py); otherwise best-of-5 µs per head.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import httptools

from bench.hop_bench import realistic
from proxy.build_info import BUILD
from proxy.codec import RequestCodec
from proxy.heads import Fields, RequestHead, _field_list


class _Sink:
    def on_request_head(self, head: RequestHead) -> None:
        pass

    def on_request_body(self, data: bytes) -> None:
        pass

    def on_request_end(self, trailers: Fields | None) -> None:
        pass


class _NoFields:
    """An httptools protocol without `on_header`: no per-field callbacks."""

    def __init__(self) -> None:
        self.heads = 0

    def on_url(self, url: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.heads += 1


def ways(heads: list[bytes]) -> dict[str, Callable[[], None]]:
    def codec() -> None:
        c = RequestCodec(_Sink(), None)
        for h in heads:
            c.feed(h)

    def bare() -> None:
        p = httptools.HttpRequestParser(_NoFields())
        for h in heads:
            p.feed_data(h)

    raws = [h[h.index(b"\r\n") + 2 : -2] for h in heads]

    def split() -> None:
        for raw in raws:
            _field_list(raw, True)

    def nothing() -> None:
        pass

    # "baseline": making the heads and the rest of this script, subtracted from the others.
    return {
        "baseline": nothing,
        "codec": codec,
        "llhttp, no field callbacks": bare,
        "split": split,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.parse_bench")
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    heads = [realistic(i) for i in range(args.count)]
    table = ways(heads)
    if args.only:
        table[args.only]()
        return
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("--instructions needs valgrind")
        base = 0
        for name in table:

            def collected(count: int, name: str = name) -> int:
                cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                       sys.executable, "-m", "bench.parse_bench", "--count", str(count),
                       "--only", name]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
                m = re.search(r"Collected : (\d+)", out)
                assert m is not None, out[-2000:]
                return int(m.group(1))

            n = (collected(12_000) - collected(2_000)) // 10_000
            if name == "baseline":
                base = n
                continue
            print(f"{name} ({BUILD.name}): {n - base} instructions/head", flush=True)
        return
    for name, fn in table.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - start) / len(heads) * 1e6)
        print(f"{name} ({BUILD.name}): {best:.2f} µs/head")


if __name__ == "__main__":
    main()
