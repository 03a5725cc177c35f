import functools
import os

import pytest

import squeezegen as sg
from squeezegen.models.tiny import TINY_CONFIGS
from squeezegen.runtime.device import AUTO_DTYPE_ENV

TINY = list(TINY_CONFIGS)


@functools.cache
def tiny(name: str):
    """(model, tokenizer) for a tiny architecture, built once per test session."""
    return sg.load(name, dtype="float32")


@pytest.fixture(scope="session")
def tok():
    return tiny("tiny-llama")[1]


@functools.cache
def smollm2():
    return sg.load("smollm2-135m", dtype="float32")


# What dtype "auto" means in this run, whatever the CPU: float32 unless the run is told otherwise
# (`SQUEEZEGEN_AUTO_DTYPE=bfloat16 pytest`, the second pass of .ci/run: the default of bf16 hosts
# and GPUs). Set for the whole session, so subprocesses (torchrun, servers) and tests that undo
# their monkeypatches see the same; tests of both resolutions set it themselves (`auto_dtype`).
os.environ.setdefault(AUTO_DTYPE_ENV, "float32")
AUTO = os.environ[AUTO_DTYPE_ENV]


@pytest.fixture(params=["float32", "bfloat16"])
def auto_dtype(request, monkeypatch) -> str:
    """Run a test once with dtype "auto" resolving to each of float32 and bfloat16."""
    monkeypatch.setenv(AUTO_DTYPE_ENV, request.param)
    return request.param
