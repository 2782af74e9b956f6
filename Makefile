# make install | demo | test | test-fast | lint | bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch for this machine: where an NVIDIA driver is present, PyPI's default (CUDA) build;
# elsewhere the pinned release whose CPU wheel CI uses. Override: make install TORCH_SPEC=...
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench mutants clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,plots,hf,slurm,mlflow]"
	touch $(STAMP)

demo: install
	$(BIN)/ablate run --dataset demo --num-runs 3
	$(BIN)/ablate status --dataset demo

# tests run in TEST_WORKERS processes (pytest-xdist), a whole module at a time, longest first (the order
# is tests/conftest.py's MODULE_SECONDS); 3 on 2 cores: several tests wait (on Slurm, on a process to
# die) while the others keep both cores busy
TEST_WORKERS ?= 3
TEST_DIST := --dist loadfile --no-loadscope-reorder
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) $(TEST_DIST) --durations=20

# the inner loop: no end-to-end subprocess tests
test-fast: install
	$(BIN)/pytest -n $(TEST_WORKERS) $(TEST_DIST) -m "not slow"

lint: install
	$(BIN)/ruff check ablation_cli tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python scripts/bench_status.py
	$(BIN)/python scripts/bench_loading.py
	$(BIN)/python scripts/bench_features.py
	$(BIN)/python scripts/bench_training.py

mutants: install
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
