# sd-pipeline: the commands a user needs. `make install` then `make demo`; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; CUDA users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DATA_ROOT ?= data
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test test-slow demo dev browser postgres spark bench bench-gpu validate clean

# `make install` also installs the headless browser tests/test_browser.py drives (see `browser`), so the README's
# two commands (`make install`, then `make test`) pass on a fresh machine as written.
install: $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	@$(MAKE) --no-print-directory browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Two workers (pytest-xdist): much of the suite waits on subprocesses (the dagster CLI, daemons, torchrun,
# img2dataset), so two test files side by side keep a 2-core machine busy (one worker: ~14 min, two: ~9; three
# were slower). `--dist loadfile` keeps a file's module fixtures and ordered test classes in one worker;
# `--no-loadscope-reorder` keeps tests/conftest.py's slowest-files-first order, so no long file is left for last.
TEST_WORKERS ?= 2
test:
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: postgres spark
	$(BIN)/python -m pytest -q -m slow

validate:
	$(BIN)/dagster definitions validate -w workspace.yaml

# The whole graph through the `dagster` CLI into $(DATA_ROOT) (instance: $(DATA_ROOT)/dagster_home); a second run
# reuses what is materialised, and re-runs what changed settings change. Other settings:
# make demo CONFIG=configs/demo-fast.yaml
CONFIG ?= configs/tiny.yaml
PORT ?= 3000
DAGSTER_HOME_DIR = $(abspath $(DATA_ROOT))/dagster_home

demo:
	$(BIN)/python -m sd_assets.demo -c $(CONFIG) --data-root $(DATA_ROOT)

# Webserver + daemon on 127.0.0.1:$(PORT), same instance and data root as `make demo`.
dev:
	@$(BIN)/python -m sd_assets.demo --init-home --data-root $(DATA_ROOT) >/dev/null
	@echo "Dagster UI: http://127.0.0.1:$(PORT)   (DAGSTER_HOME=$(DAGSTER_HOME_DIR), Ctrl-C stops it)"
	@echo "The schedule and sensors start stopped: switch them on in the UI (Automation) or, in another shell,"
	@echo "  export DAGSTER_HOME=$(DAGSTER_HOME_DIR)"
	@echo "  $(BIN)/dagster schedule start -w workspace.yaml latents_refresh   # re-encode missing/stale shards"
	@echo "  $(BIN)/dagster sensor start -w workspace.yaml shard_sensor        # new shard parts -> downloads"
	@echo "  ($(BIN)/dagster sensor list -w workspace.yaml and schedule list show them all)"
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) SD_DATA_ROOT=$(abspath $(DATA_ROOT)) PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

# Headless Chromium for tests/test_browser.py (Debian's package; needs root or sudo). Idempotent.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; } \
		|| echo "make browser: could not install chromium (needs apt-get as root); tests/test_browser.py will fail"; fi

# Debian's PostgreSQL server for tests/test_postgres_instance.py, which starts its own throwaway cluster
# (needs root or sudo). Idempotent.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgres: $$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql; } \
		|| echo "make postgres: could not install postgresql (needs apt-get as root); tests/test_postgres_instance.py will fail"; fi

# Java (Debian's default-jre-headless; needs root or sudo) and pyspark (the `spark` extra, into $(VENV)) for
# `download.distributor: pyspark` and tests/test_spark_download.py. Idempotent.
spark: $(BIN)/python
	@if command -v java >/dev/null 2>&1; then echo "java: $$(java -version 2>&1 | head -1)"; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless; } \
		|| echo "make spark: could not install Java (needs apt-get as root or sudo); download.distributor pyspark will be refused"; fi
	@$(BIN)/python -c "import pyspark; print('pyspark:', pyspark.__version__)" 2>/dev/null \
		|| $(BIN)/python -m pip install -q -e ".[spark]"

# Every benchmarks/bench_*.py prints its figures as a markdown section; copy them into BENCHMARKS.md.
bench:
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

# Every GPU figure of DESIGN.md section 6 on one CUDA device (<= 8 min), as markdown for BENCHMARKS.md; ends
# with pytest -m gpu. DRY_RUN=1: the same script on CPU at toy shapes (< 1 min), to check it before GPU time.
DRY_RUN ?=
bench-gpu:
	$(BIN)/python benchmarks/bench_gpu.py $(if $(filter-out 0,$(DRY_RUN)),--dry-run,--require-cuda)

clean:
	rm -rf $(DATA_ROOT)
