# make train / make test create the environment when it is missing, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of torch on local disk (PIP_FIND_LINKS) is used when present; otherwise pip resolves the range.
LOCAL_TORCH := $(firstword $(wildcard $(PIP_FIND_LINKS)/torch-*+cpu-*.whl))
TORCH_SPEC ?= $(if $(LOCAL_TORCH),$(LOCAL_TORCH),torch>=2.6)
PYTEST_ARGS ?=

.PHONY: train test lint format clean help gpu-check bench

help:
	@echo "make train   train the default decoder on the Python standard library (CPU, ~3 min)"
	@echo "make test    run the test suite"
	@echo "make lint    ruff check + format check"
	@echo "make bench   throughput and MFU of the training step (ARGS=... passes options)"
	@echo "make gpu-check  CUDA tests and FSDP/compile benchmarks on a GPU machine"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python scripts/train.py $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check llmtrain scripts tests
	$(BIN)/ruff format --check llmtrain scripts tests

format: $(BIN)/.installed
	$(BIN)/ruff format llmtrain scripts tests
	$(BIN)/ruff check --fix llmtrain scripts tests

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench.py $(ARGS)

# On a CUDA machine: CUDA tests + bf16 FSDP/compile benchmarks of the three families (see docs/benchmarks.md).
gpu-check:  # the project's environment where there is one (a lent GPU machine has its own torch: python3)
	GPU_PY=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .cache runs outputs wandb
