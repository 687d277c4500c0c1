# Two commands do all set-up: `make up` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck pytest browser fuzz bench bench-registry bench-push bench-balance clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/tether up

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) browser
	$(BIN)/pytest -q -p no:cacheprovider

# The dashboard's browser test drives Debian's chromium through chromium-driver:
# installed here when missing (idempotent, quick when present); where apt cannot install
# it, the test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      chromium chromium-driver) >/dev/null 2>&1 || \
	    echo "make browser: chromium could not be installed; the dashboard's browser test will skip"; }

# Coverage-guided differential fuzzing of the HTTP codecs (tests/fuzz_codec.py): the
# corpus check `make test` runs, for FUZZ_SECONDS on inputs atheris makes up.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	$(BIN)/python -m tests.fuzz_codec -max_total_time=$(FUZZ_SECONDS)

bench: $(STAMP)
	$(BIN)/python -m bench.proxy_bench
	$(BIN)/python -m bench.balance_path_bench

bench-registry: $(STAMP)
	$(BIN)/python -m bench.registry_bench

bench-push: $(STAMP)
	$(BIN)/python -m bench.push_bench

bench-balance: $(STAMP)
	$(BIN)/python -m bench.balance_bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
