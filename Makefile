# `make demo` and `make test` each create .venv when it is missing, install the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-contrast test test-kernels lint format clean lock

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

# `make test`: every test. Those marked `serial` (they spawn processes of their own or time
# themselves) run apart, one at a time; the rest run on JOBS pytest-xdist workers of one thread
# each. Then the numerics-sensitive tests run again under each other CPU kernel the machine has
# (test-kernels), so that no result depends on which x86 kernel a machine picks.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
NUMERIC_TESTS := tests/test_contrast_parity.py tests/test_pixel_contrast.py \
	tests/test_contrast_module.py tests/test_autograd_functions.py tests/test_sampling.py \
	tests/test_memory.py tests/test_selection_checks.py tests/test_lovasz.py tests/test_rmi.py \
	tests/test_ohem.py tests/test_aaf.py tests/test_loss_set.py tests/test_metrics.py \
	tests/test_test_procedure.py tests/test_inference_modes.py tests/test_export.py \
	tests/test_released_eval.py tests/test_convert.py
# Every kernel PyTorch can use here (`make test-kernels`); `make test` passes the others only.
KERNELS ?= $(shell $(BIN)/python scripts/cpu_kernels.py)

test: $(STAMP)
	$(PYTEST) -n $(JOBS) --dist worksteal -m "not serial"
	$(PYTEST) -m serial
	$(MAKE) --no-print-directory test-kernels KERNELS="$$($(BIN)/python scripts/cpu_kernels.py --others)"

test-kernels: $(STAMP)
	@for kernel in $(KERNELS); do \
	  echo "numerics-sensitive tests with ATEN_CPU_CAPABILITY=$$kernel"; \
	  ATEN_CPU_CAPABILITY=$$kernel $(PYTEST) -n $(JOBS) --dist worksteal -m "not serial" \
	    $(NUMERIC_TESTS) || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff format --check src tests examples scripts
	$(BIN)/ruff check src tests examples scripts

format: $(STAMP)
	$(BIN)/ruff format src tests examples scripts
	$(BIN)/ruff check --fix src tests examples scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
