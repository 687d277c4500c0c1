# Two commands do all set-up: `make up` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test test-tools lint typecheck pytest pytest-pure fuzz bench bench-registry bench-push bench-balance bench-chaos clean

# The per-request modules compiled with mypyc (proxy/build_info.py lists them): built by
# the install step and again whenever one of their sources is newer than the build.
# Without a C compiler nothing is compiled and the same sources run as pure Python.
COMPILED := $(VENV)/.compiled
HOT_SOURCES := $(shell sed -n 's/^    "\(proxy\.[a-z0-9_.]*\)",$$/\1/p' proxy/build_info.py | tr . / | sed 's/$$/.py/')

# One line per step: pip's own output stays quiet, but a first run never looks stuck.
# A .venv without pip (venv created without ensurepip, e.g. Debian lacking python3-venv)
# is made again rather than half-used.
$(STAMP): pyproject.toml
	@echo "make: [1/3] creating $(VENV) with $(PYTHON) -m venv"
	@test -x $(BIN)/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || { \
	  rm -rf $(VENV); \
	  echo "make: $(PYTHON) -m venv failed: Python 3.11+ with venv is needed" \
	       "(on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	@echo "make: [2/3] upgrading pip (from the package index)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@echo "make: [3/3] installing tether and its dependencies into $(VENV) (a minute or two the first time)"
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)
	@echo "make: $(VENV) is ready"

# Never fails: without a compiler (or if compiling fails) the pure-Python modules run,
# and the sidecar says which build it runs.
$(COMPILED): $(HOT_SOURCES) proxy/build.py proxy/build_info.py | $(STAMP)
	@$(BIN)/python -m proxy.build
	@touch $(COMPILED)

# UP_FLAGS: flags for `tether up` (e.g. UP_FLAGS="--registry-port 0 --no-view").
up: $(COMPILED)
	$(BIN)/tether up $(UP_FLAGS)

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite runs on PYTEST_WORKERS processes (pytest-xdist; most tests wait on real
# processes and sockets, so two workers halve the time even on two cores). A module's
# tests stay on one worker (--dist loadscope): module fixtures are made once.
PYTEST_WORKERS ?= 2
pytest: $(COMPILED) test-tools
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadscope

# The proxy's own tests with the compiled build switched off (CI runs both builds).
PURE_TESTS := tests/test_exchange.py tests/test_proxy_codec.py tests/test_codec_differential.py \
  tests/test_router_conformance.py tests/test_proxy_http.py tests/test_proxy_hardening.py \
  tests/test_balance_units.py tests/test_build.py
pytest-pure: $(STAMP)
	TETHER_PURE=1 $(BIN)/pytest -q -p no:cacheprovider $(PURE_TESTS)

# Tools the tests run besides the venv, from Debian's packages (command:package):
# docker-compose (`docker-compose config` checks what `tether inject` writes for compose;
# it needs no Docker engine), chromium and its driver (the dashboard's browser test).
# Installed when missing and apt-get is there; otherwise those tests skip and say why.
TEST_TOOLS := docker-compose:docker-compose chromium:chromium chromedriver:chromium-driver
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do \
	  command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	  [ -z "$$missing" ] || ! command -v apt-get >/dev/null 2>&1 \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 \
	      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1) \
	  || echo "could not install$$missing: the tests that need them skip and say why"

# Coverage-guided differential fuzzing of the HTTP codecs (tests/fuzz_codec.py): the
# corpus check `make test` runs, for FUZZ_SECONDS on inputs atheris makes up.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	$(BIN)/python -m tests.fuzz_codec -max_total_time=$(FUZZ_SECONDS)

bench: $(COMPILED)
	$(BIN)/python -m bench.proxy_bench
	$(BIN)/python -m bench.h2_bench
	$(BIN)/python -m bench.balance_path_bench

bench-registry: $(STAMP)
	$(BIN)/python -m bench.registry_bench

bench-push: $(STAMP)
	$(BIN)/python -m bench.push_bench

bench-balance: $(STAMP)
	$(BIN)/python -m bench.balance_bench

# Faults at full scale (kill, 50% failing, latency, retry storm): docs/benchmarks.md.
bench-chaos: $(STAMP)
	$(BIN)/python -m bench.chaos_bench

clean:
	-$(BIN)/python -m proxy.build --clean
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
