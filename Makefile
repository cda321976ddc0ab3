# sd-pipeline: the commands a user needs. `make install` then `make demo`; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; CUDA users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DATA_ROOT ?= data
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test test-slow demo dev bench validate clean

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

demo:
	@echo "make demo: not yet available (issue: end to end for users)"

dev:
	@echo "make dev: not yet available (issue: end to end for users)"

bench:
	@echo "make bench: not yet available"

clean:
	rm -rf $(DATA_ROOT)
