"""Wrong inputs into every entry point that reaches C code: one SqueezegenError before the call
(the C loops trust their shapes; before these checks a decode with too many tokens wrote past
the cache and corrupted the heap), and the engine decodes on as if nothing had happened."""

import re

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.quant.int4 import int4_linear, quantize_int4
from squeezegen.quant.kernels import binary_linear
from squeezegen.runtime import native
from squeezegen.runtime.native_step import NativeStep

from .conftest import tiny

PROMPT = torch.tensor([[5, 6, 7], [8, 9, 10]])
WRONG_TOKENS = [
    torch.tensor([1, 2, 3]),  # three tokens for two rows
    torch.tensor([1]),  # one token for two rows
    torch.tensor([[1, 2]]),  # a (1, 2) matrix
    torch.tensor([[1], [2]]),  # (2, 1): HF's input_ids shape, not the engine's
    torch.tensor([1.0, 2.0]),  # floats
    torch.tensor([True, False]),
    torch.tensor([1, 10**7]),  # beyond the vocabulary
    torch.tensor([-1, 2]),
    [1, 2],  # not a tensor
]


@pytest.mark.parametrize("native_step", [True, False])
@pytest.mark.parametrize("bad", WRONG_TOKENS, ids=lambda t: repr(t).replace(" ", ""))
def test_a_wrong_decode_input_is_refused_and_decoding_goes_on(native_step, bad):
    model, _ = tiny("tiny-llama")
    engine = sg.Engine(model, native=native_step)
    engine.prefill(PROMPT)
    first = engine.decode(torch.tensor([1, 2]))
    with pytest.raises(SqueezegenError) as caught:
        engine.decode(bad)
    assert "\n" not in str(caught.value)
    after = engine.decode(torch.tensor([3, 4]))
    reference = sg.Engine(model, native=native_step)
    reference.prefill(PROMPT)
    assert torch.equal(first, reference.decode(torch.tensor([1, 2])))
    assert torch.equal(after, reference.decode(torch.tensor([3, 4])))


def test_the_native_step_ran_in_these_tests():
    model, _ = tiny("tiny-llama")
    engine = sg.Engine(model)
    engine.prefill(PROMPT)
    engine.decode(torch.tensor([1, 2]))
    assert isinstance(engine.fused.native, NativeStep) and engine.fused.native.steps > 0


def test_the_first_decode_checks_its_input_too():
    model, _ = tiny("tiny-llama")
    engine = sg.Engine(model)
    with pytest.raises(SqueezegenError, match="prefill first"):
        engine.decode(torch.tensor([1]))
    engine.prefill(PROMPT)
    with pytest.raises(SqueezegenError, match="3 row"):
        engine.decode(torch.tensor([1, 2, 3]))
    assert engine.decode(torch.tensor([1, 2])).shape[0] == 2


@pytest.mark.parametrize(
    "ids, mask",
    [
        (torch.tensor([5, 6, 7]), None),  # one dimension
        (torch.tensor([[5.0, 6.0]]), None),
        (torch.tensor([[5, 10**7]]), None),
        (torch.zeros(1, 0, dtype=torch.long), None),
        (torch.tensor([[5, 6, 7]]), torch.ones(1, 2)),  # a mask of another shape
    ],
)
def test_a_wrong_prefill_input_is_refused(ids, mask):
    model, _ = tiny("tiny-llama")
    with pytest.raises(SqueezegenError):
        sg.Engine(model).prefill(ids, mask)


def test_a_second_chunk_of_other_rows_is_refused():
    model, _ = tiny("tiny-llama")
    engine = sg.Engine(model)
    engine.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(SqueezegenError, match="2 row"):
        engine.prefill(torch.tensor([[8, 9], [10, 11]]), compress=False)


def test_the_native_step_checks_what_the_engine_passes():
    model, _ = tiny("tiny-llama")
    engine = sg.Engine(model)
    engine.prefill(PROMPT)
    engine.decode(torch.tensor([1, 2]))
    step = engine.fused.native
    for tokens, positions in [
        (torch.tensor([1, 2, 3]), torch.tensor([4, 4, 4])),
        (torch.tensor([1, 2]), torch.tensor([4])),
        (torch.tensor([1, 2]), torch.tensor([4, 4], dtype=torch.int32)),
    ]:
        with pytest.raises(SqueezegenError):
            step(engine, tokens, positions)


def test_dense_kernel_refuses_an_input_of_another_width():
    weight = torch.randn(8, 16)
    for x in (torch.randn(2, 17), torch.randn(2, 15), torch.tensor(1.0)):
        with pytest.raises(SqueezegenError, match="16"):
            native.dense_linear(x, weight)
    with pytest.raises(SqueezegenError):
        native.dense_linear(torch.randn(2, 16), torch.randn(8, 16, 1))


def test_int4_kernel_refuses_mismatched_inputs_and_weights():
    packed, scales, mins = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(SqueezegenError, match="64"):
        int4_linear(torch.randn(1, 32), packed, scales, mins, 32)
    bad_weights = [
        (packed, scales[:, :1].contiguous(), mins, 32),  # scales of another group count
        (packed, scales, mins, 64),  # a group that does not match the scales
        (packed, scales, mins, 0),
        (packed.to(torch.int32), scales, mins, 32),
        (packed, scales.float(), mins.float(), 32),
    ]
    for p, s, m, group in bad_weights:
        with pytest.raises(SqueezegenError):
            int4_linear(torch.randn(1, 64), p, s, m, group)


def test_binary_kernel_refuses_tensors_of_another_layer():
    packed = torch.zeros(8, 2, dtype=torch.uint8)  # 8 outputs, 16 inputs
    out_scales = torch.ones(1, 8)
    assert binary_linear(torch.randn(1, 16), packed, 8, None, out_scales, None, None, False).shape == (1, 8)
    wrong = [
        (torch.randn(1, 24), packed, out_scales, None),  # 24 inputs for signs of 16
        (torch.randn(1, 16), packed, torch.ones(1, 9), None),
        (torch.randn(1, 16), packed, out_scales, torch.ones(9)),
        (torch.randn(1, 16), packed, out_scales.double(), None),
    ]
    for x, p, scales, bias in wrong:
        with pytest.raises(SqueezegenError):
            binary_linear(x, p, 8, None, scales, None, bias, False)


def test_an_engine_or_quantizer_given_the_wrong_objects_says_what_it_takes():
    pair = sg.load("tiny-llama", dtype="float32")
    model = pair[0]
    for call, message in [
        (lambda: sg.Engine(pair), "sg.load returns (model, tokenizer)"),
        (lambda: sg.Engine(None), "model must be a Hugging Face causal LM"),
        (lambda: sg.Engine(model, method="h2o"), "sg.method('h2o')"),
        (lambda: sg.Engine(model, reserve="5"), "reserve is a number of decode steps"),
        (lambda: sg.quantize_(pair, sg.Int4WeightOnlyConfig()), "sg.load returns (model, tokenizer)"),
        (lambda: sg.quantize_(model, "int4"), "config must be sg.Int4WeightOnlyConfig"),
        (lambda: sg.binarize_(model, sg.Int4WeightOnlyConfig()), "config must be sg.BinaryMoSConfig"),
        (lambda: sg.generate(model, None, "hi"), "tokenizer must be the model's tokenizer"),
        (lambda: sg.generate(model, pair[1], "hi", ignore_eos="no"), "ignore_eos must be True or False"),
        (lambda: sg.generate(model, pair[1], "hi", stream=5), "stream must be a function"),
    ]:
        with pytest.raises(sg.SqueezegenError, match=re.escape(message)):
            call()
    assert not any(type(m).__name__ in ("Int4Linear", "BinaryLinear") for m in model.modules())
