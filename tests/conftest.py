import functools

import pytest

import squeezegen as sg
from squeezegen.models.tiny import TINY_CONFIGS

TINY = list(TINY_CONFIGS)


@functools.cache
def tiny(name: str):
    """(model, tokenizer) for a tiny architecture, built once per test session."""
    return sg.load(name)


@pytest.fixture(scope="session")
def tok():
    return tiny("tiny-llama")[1]


@functools.cache
def smollm2():
    return sg.load("smollm2-135m")
