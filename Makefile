# `make demo` and `make test` each create .venv when it is missing, install the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-contrast test lint format clean lock

# requirements.lock pins every runtime and dev dependency; `make lock` regenerates it (README).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

lock:
	scripts/lock.sh

demo: $(STAMP)
	@echo "removing runs/demo (the previous run of this demo, if any), then training it anew"
	rm -rf runs/demo
	$(BIN)/contrastseg train configs/demo.yaml

demo-contrast: $(STAMP)
	@echo "removing runs/demo_contrast (the previous run of this demo, if any), then training it anew"
	rm -rf runs/demo_contrast
	$(BIN)/contrastseg train configs/demo_contrast.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check src tests examples scripts
	$(BIN)/ruff check src tests examples scripts

format: $(STAMP)
	$(BIN)/ruff format src tests examples scripts
	$(BIN)/ruff check --fix src tests examples scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
