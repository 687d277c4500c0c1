"""Coverage-guided differential fuzzing of the codecs (`make fuzz`), with atheris.

Each input atheris makes is checked as in `make test` (tests/codec_differential.py):
fed cold, warm and split at every offset, to the request and the response codec, with
one result required; a disagreement, or any exception but `BadMessageError`, stops the
run with the input saved (libFuzzer's crash-* file). The seeds start the corpus.

    .venv/bin/python -m tests.fuzz_codec -max_total_time=300 [libFuzzer flags]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from proxy import codec  # noqa: F401  (instrumented for coverage)
    from tests.codec_differential import SEEDS, differences

# Inputs longer than this add time per input, not coverage.
MAX_INPUT = 2048


def check_one(data: bytes) -> None:
    problems = differences(data[:MAX_INPUT])
    if problems:
        raise AssertionError("\n".join(problems[:3]))


def main() -> None:
    seeds = Path(tempfile.mkdtemp(prefix="codec-seeds-"))
    for i, seed in enumerate(SEEDS):
        (seeds / f"seed-{i}").write_bytes(seed)
    atheris.Setup([*sys.argv, f"-max_len={MAX_INPUT}", str(seeds)], check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
