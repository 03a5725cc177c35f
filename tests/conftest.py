import functools

import pytest

import squeezegen as sg
from squeezegen.models.tiny import TINY_CONFIGS

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


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """dtype "auto" means float32 in tests on any machine (bf16 where the CPU has AMX would change
    the numbers the tests compare); tests of the choice itself patch it back."""
    monkeypatch.setattr("squeezegen.runtime.device._native_bf16", lambda kind: False)
