"""Continuous batching (runtime/batching.py): rows prefilled apart, each under its own method
(decode-time eviction included), join one batch at different steps, leave when done, and each
row gets exactly the tokens it gets decoding alone."""

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.runtime.batching import stack, take
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import prefill_rows

from .conftest import tiny
from .test_fastkv import token_ids

NEW = 30
METHODS = [  # (method, prompt length); budgets below the prompts, so every method evicts
    (None, 40),
    (sg.method("h2o", budget=24), 52),
    (sg.method("rpc", P=8, R=4, c=2), 45),  # compresses after 12, 20 and 28 of its own steps
    (sg.method("tova", budget=20), 38),
    (sg.method("streaming_llm", budget=16), 60),
    (sg.method("snapkv", budget=0.5, window=8), 47),
    (sg.method("rpc", P=8, R=4, c=4), 33),
]
JOINS = {0: [0, 1, 2], 5: [3, 4], 9: [5, 6]}  # batch step -> requests that join before it


def prefilled(model, method, n, seed, native):
    engine = Engine(model, method, reserve=NEW - 1, native=native)
    logits = prefill_rows(engine, [[token_ids(model.tok, n, seed=seed)[0].tolist()]], 0)
    return engine, int(logits.argmax(-1))


def alone(model, method, n, seed, native):
    engine, token = prefilled(model, method, n, seed, native)
    out = [token]
    while len(out) < NEW:
        out.append(int(engine.decode(torch.tensor([out[-1]])).argmax(-1)))
    return out


@pytest.mark.parametrize("native", [True, False])
def test_rows_of_every_method_share_a_batch_and_each_equals_its_row_alone(native):
    model, tok = tiny("tiny-llama")
    model.tok = tok
    refs = [alone(model, m, n, seed, native) for seed, (m, n) in enumerate(METHODS)]
    batch, running, out, step = None, [], {}, 0
    while len(out) < len(METHODS) or running:
        for i in JOINS.get(step, []):
            engine, token = prefilled(model, METHODS[i][0], METHODS[i][1], i, native)
            engine.start_decoding()
            batch = engine if batch is None else stack([batch, engine])
            running.append(i)
            out[i] = [token]
        logits = batch.decode(torch.tensor([out[i][-1] for i in running]))
        for row, i in enumerate(running):
            out[i].append(int(logits[row].argmax()))
        keep = [row for row, i in enumerate(running) if len(out[i]) < NEW]
        running = [running[row] for row in keep]
        batch = take(batch, keep)
        step += 1
    assert [out[i] for i in range(len(METHODS))] == refs
    assert refs[1] != alone(model, None, METHODS[1][1], 1, native)  # H2O's eviction changed its tokens


def test_rows_under_one_method_state_leave_together():
    model, tok = tiny("tiny-llama")
    model.tok = tok
    engine = Engine(model, sg.method("h2o", budget=24), reserve=4)
    ids = [token_ids(tok, 40, seed=s)[0].tolist() for s in (1, 2)]
    prefill_rows(engine, [[ids[0]], [ids[1]]], 0)
    engine.start_decoding()
    with pytest.raises(SqueezegenError, match="leave together"):
        take(engine, [1])
    other, _ = prefilled(model, None, 30, 3, True)
    other.start_decoding()
    batch = stack([engine, other])
    with pytest.raises(SqueezegenError, match="leave the batch together"):
        take(batch, [0, 2])
    moved = take(batch, [2, 0, 1])  # the group's two rows, still together and in order
    assert [(g.start, g.stop) for g in moved.method.groups] == [(1, 3)]
    assert moved.method.groups[0].engine.cache.layers[0].pos.data_ptr() == moved.cache.layers[0].pos[1:].data_ptr()
