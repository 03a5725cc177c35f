import math

import pytest
import torch

from squeezegen.runtime.attention import dense_attention, repeat_kv, visibility_mask


def test_visibility_mask_by_hand():
    # row 0: two pads then positions 0..2; row 1: positions 0..4
    qpos = torch.tensor([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    mask = visibility_mask(qpos, qpos[:, None])
    expected_row0 = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # a pad sees only pads
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],  # position 0 sees itself, not the pads
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_visibility_mask_window_and_per_head_keys():
    qpos = torch.tensor([[10]])
    kpos = torch.tensor([[[3, 7, 8, 10], [0, 9, 10, -1]]])  # two KV heads kept different entries
    mask = visibility_mask(qpos, kpos, window=3)  # sees positions 8, 9, 10
    assert torch.equal(mask[0, :, 0], torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool))


def naive_attention(q, k, v, scaling, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_dense_attention_matches_naive_with_gqa_mask_and_causal():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    scale = 1 / math.sqrt(8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    ref = naive_attention(q, k, v, scale, causal)
    assert torch.allclose(dense_attention(q, k, v, scale, causal=True), ref, atol=1e-6)
    assert torch.allclose(dense_attention(q, k, v, scale, mask=causal), ref, atol=1e-6)
    # a per-KV-head mask (after per-head eviction) is expanded to that head's query heads
    per_head = torch.rand(2, 2, 5, 5) > 0.3
    per_head[..., 0] = True
    assert torch.allclose(
        dense_attention(q, k, v, scale, mask=per_head),
        naive_attention(q, k, v, scale, per_head.repeat_interleave(3, 1)),
        atol=1e-6,
    )


def test_dense_attention_single_query_grouped_path():
    torch.manual_seed(1)
    q = torch.randn(1, 6, 1, 8)
    k = torch.randn(1, 2, 7, 8)
    v = torch.randn(1, 2, 7, 8)
    mask = torch.tensor([[[[0, 1, 1, 1, 1, 1, 1]], [[1, 1, 0, 1, 1, 1, 1]]]], dtype=torch.bool)
    out = dense_attention(q, k, v, 0.5, mask=mask)
    assert out.shape == (1, 6, 1, 8)
    assert torch.allclose(out, naive_attention(q, k, v, 0.5, mask.repeat_interleave(3, 1)), atol=1e-6)


def test_padding_query_rows_stay_finite():
    qpos = torch.tensor([[-1, -1, 0, 1]])
    mask = visibility_mask(qpos, qpos[:, None])
    q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    assert torch.isfinite(dense_attention(q, k, v, 0.5, mask=mask)).all()


def test_banded_sliding_attention_equals_the_masked_dense_one():
    from squeezegen.runtime.attention import banded_attention

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, 50, 8, generator=g) for h in (4, 2, 2))
    # ascending positions with gaps (a propagated subset), different per row
    positions = torch.stack([torch.arange(50) * 2, torch.arange(50) + torch.arange(50) // 7])
    for window in (5, 12):
        mask = visibility_mask(positions, positions[:, None], window)
        dense = dense_attention(query, key, value, 0.3, mask)
        assert torch.allclose(banded_attention(query, key, value, 0.3, positions, window), dense, atol=1e-6)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_attention_both_cpu_paths_equal_the_float32_reference(monkeypatch, native, dtype, tolerance):
    """The one-query kernel takes SDPA or (bf16 on a CPU with native bf16) two matmuls: both are
    checked on any CPU against a float32 softmax by hand, GQA and empty slots included."""
    from squeezegen.runtime import attention

    monkeypatch.setattr(attention, "native_bf16", lambda device: native)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    visible = torch.rand(2, 3, 10) > 0.3
    visible[..., 0] = True
    out = attention.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), visible, 0.35)
    assert out.dtype == dtype and out.shape == (2, 6, 1, 8)
    q32, k32, v32 = (t.to(dtype).float() for t in (q, k, v))  # the same inputs, computed in float32
    scores = (q32.view(2, 3, 2, 8) @ k32.transpose(-1, -2)) * 0.35
    probs = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
    reference = (probs @ v32).reshape(2, 6, 1, 8)
    assert (out.float() - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("case", ["causal", "mask with padding and per-head entries", "chunk after a cache"])
def test_bf16_prefill_attention_is_the_float32_result_rounded(monkeypatch, native, case):
    """A bf16 prefill chunk on a CPU with native bf16 goes through blocked matmuls (blocks of 128
    queries, GQA grouped, causal blocks reading only their keys), elsewhere through SDPA: both
    within bf16 rounding of the float32 softmax by hand, over three blocks (one partial)."""
    from squeezegen.runtime import attention

    monkeypatch.setattr(attention, "native_bf16", lambda device: native)
    torch.manual_seed(1)
    n_q, n_k = 300, 300 if case != "chunk after a cache" else 420
    q, k, v = torch.randn(2, 6, n_q, 16), torch.randn(2, 2, n_k, 16), torch.randn(2, 2, n_k, 16)
    mask = None
    if case == "mask with padding and per-head entries":
        positions = torch.arange(n_q).expand(2, -1) - torch.tensor([[0], [40]])  # row 1: 40 pads on the left
        key_pos = positions[:, None].repeat(1, 2, 1).masked_fill(torch.rand(2, 2, n_q) < 0.2, -1)
        key_pos[1, :, :40] = -1
        mask = visibility_mask(positions.masked_fill(positions < 0, -1), key_pos)
    elif case == "chunk after a cache":  # the last 300 positions of 420, the first 120 cached
        mask = visibility_mask(torch.arange(120, 420).expand(2, -1), torch.arange(420).expand(2, 2, -1))
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    out = attention.dense_attention(q16, k16, v16, 0.3, mask, causal=mask is None)
    causal = torch.ones(n_q, n_k, dtype=torch.bool).tril()[None, None]
    visible = causal if mask is None else mask.repeat_interleave(3, 1)
    reference = naive_attention(*(t.float() for t in (q16, k16, v16)), 0.3, visible)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 6, n_q, 16)
    assert (out.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
