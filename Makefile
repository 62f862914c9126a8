# `make demo` and `make test` each create .venv when it is missing, install the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-contrast demo-proto test test-kernels fuzz lint format clean lock

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

demo-proto: $(STAMP)
	@echo "removing runs/demo_proto (the previous run of this demo, if any), then training it anew"
	rm -rf runs/demo_proto
	$(BIN)/contrastseg train configs/demo_proto.yaml

# `make test`: every test. The numerics-sensitive ones (marker `numerics`, tests/conftest.py) run
# under each CPU kernel PyTorch can use on this machine (`default`, `avx2`, `avx512`), so that no
# result depends on the kernel a machine picks; the rest run under the machine's own. Tests marked
# `serial` (they spawn processes of their own or time themselves) run apart, one at a time; the
# others on JOBS pytest-xdist workers of one thread each (docs/testing.md).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
KERNELS ?= $(shell $(BIN)/python scripts/cpu_kernels.py)

test: $(STAMP)
	$(PYTEST) -n $(JOBS) --dist worksteal -m "not serial and not numerics"
	$(PYTEST) -m serial
	$(MAKE) --no-print-directory test-kernels

# One pytest-xdist worker per kernel (its ATEN_CPU_CAPABILITY set before PyTorch starts), and
# every numerics-sensitive test sent to each worker (--dist each).
test-kernels: $(STAMP)
	@echo "numerics-sensitive tests under each CPU kernel: $(KERNELS)"
	$(PYTEST) $(foreach k,$(KERNELS),--tx popen//env:ATEN_CPU_CAPABILITY=$(k)) --dist each \
	  -m "numerics and not serial" $$($(BIN)/python tests/numerics.py)

# `make fuzz`: the fuzz suite of tests/test_fuzz.py at full size (docs/fuzzing.md): about 1,260
# generated configs, checkpoints, payloads, images, label maps, split lists, command lines and
# special files through the real commands (`make test` runs a small fixed subset of the same
# tests), each case's outcome recorded in runs/fuzz/outcomes.jsonl, then the table of outcomes
# printed and written to runs/fuzz/table.md; the inputs of failing cases are kept in
# runs/fuzz/failures/. Exits with pytest's status, after the table.
FUZZ_EXAMPLES ?= 90
fuzz: $(STAMP)
	rm -rf runs/fuzz
	mkdir -p runs/fuzz
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RECORD=runs/fuzz/outcomes.jsonl FUZZ_KEEP=runs/fuzz/failures \
	  $(PYTEST) -n $(JOBS) tests/test_fuzz.py; status=$$?; \
	  $(BIN)/python scripts/fuzz_table.py runs/fuzz/outcomes.jsonl --out runs/fuzz/table.md; \
	  exit $$status

lint: $(STAMP)
	$(BIN)/ruff format --check src tests examples scripts
	$(BIN)/ruff check src tests examples scripts

format: $(STAMP)
	$(BIN)/ruff format src tests examples scripts
	$(BIN)/ruff check --fix src tests examples scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
