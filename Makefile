# sd-pipeline: the commands a user needs. `make install` then `make demo`; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; CUDA users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DATA_ROOT ?= data
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test test-slow demo dev browser bench validate clean

install: $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

validate:
	$(BIN)/dagster definitions validate -w workspace.yaml

# The whole graph through the `dagster` CLI into $(DATA_ROOT) (instance: $(DATA_ROOT)/dagster_home); a second run
# reuses what is materialised. Other settings: make demo CONFIG=configs/demo-fast.yaml
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

# Every benchmarks/bench_*.py prints its figures as a markdown section; copy them into BENCHMARKS.md.
bench:
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

clean:
	rm -rf $(DATA_ROOT)
