"""The decode-time dense kernel (runtime/csrc/dense_linear.c) against float64 products by hand, and the
C step's structs against their ctypes mirrors."""

import pytest
import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime import native


def test_the_kernel_builds():
    assert native.runtime_library() is not None, "the dense kernel did not build: is a C compiler (gcc) installed?"


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("shape", [(44, 30), (37, 13), (576, 1000)])  # odd widths and row counts; threads
def test_dense_kernel_equals_the_product(weight_dtype, x_dtype, tokens, shape):
    d_in, d_out = shape
    torch.manual_seed(0)
    weight = torch.randn(d_out, d_in).to(weight_dtype)
    x = torch.randn(2, tokens // 2 or 1, d_in).to(x_dtype) if tokens > 1 else torch.randn(1, 1, d_in).to(x_dtype)
    y = native.dense_linear(x, weight)
    reference = x.double() @ weight.double().T
    assert y.dtype == x_dtype and y.shape == (*x.shape[:-1], d_out)
    tolerance = 1e-6 if x_dtype == torch.float32 else 8e-3  # float32 sums; a bf16 output rounds to 2^-8
    assert ((y.double() - reference).abs().max() / reference.abs().max()).item() <= tolerance


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])  # bf16 x by bf16 weights: the bf16 path
@pytest.mark.parametrize("count", [6, 16])  # a partial tile of tokens; the most a call takes
def test_each_row_of_a_batch_gets_the_bits_it_gets_alone(weight_dtype, x_dtype, count):
    weight = torch.randn(515, 530).to(weight_dtype)  # a partial block of four rows, a tail of columns
    rows = torch.randn(count, 530).to(x_dtype)
    together = native.dense_linear(rows, weight)
    assert all(torch.equal(together[i], native.dense_linear(rows[i : i + 1], weight)[0]) for i in range(count))


def test_what_the_kernel_does_not_take_is_left_to_torch():
    weight = torch.randn(8, 16)
    assert native.dense_linear(torch.randn(native.KERNEL_TOKENS + 1, 16), weight) is None  # a prefill
    assert native.dense_linear(torch.randn(1, 16), weight.double()) is None
    assert native.dense_linear(torch.randn(1, 16).half(), weight) is None
    assert native.dense_linear(torch.randn(1, 16), weight.T.contiguous().T) is None  # not row-major
    y = native.dense_linear(torch.randn(4, 32)[:, ::2], weight)  # a strided input is made contiguous
    assert y is not None and y.shape == (4, 8)


def test_the_c_steps_structs_are_checked_against_their_ctypes_mirrors():
    """The library's struct sizes and constants are compared with native_step.py's mirrors when it
    loads: a mismatch is one error naming the field, not memory written out of place."""
    from squeezegen.runtime import native_step

    real = native_step._library()
    assert real is not None  # loaded, so the check passed on the real library

    class Mismatched:
        @staticmethod
        def sg_decode_layout(out):
            real.sg_decode_layout(out)
            out[1] += 8  # sizeof(Layer) as if the C struct had gained a field

    with pytest.raises(SqueezegenError, match=r"sizeof\(Layer\) \d+ in C, \d+ here"):
        native_step.check_layout(Mismatched())
