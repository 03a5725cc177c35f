"""Hand-computed checks of the shared selection pieces."""

import math

import pytest
import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import (
    attention_probs,
    column_sums,
    keep_top,
    pool1d,
    reduce_gqa,
    resolve_budget,
    window_scores,
)


def positions(n, b=1, h=1):
    p = torch.arange(n)[None].expand(b, n)
    return p, p[:, None].expand(b, h, n)


def test_window_scores_by_hand():
    # one head, D = 1: key values 0, 0, ln 3, 0 ; queries all 1 (scaling 1) -> scores = key values
    key = torch.tensor([0.0, 0.0, math.log(3), 0.0]).view(1, 1, 4, 1)
    query = torch.ones(1, 1, 4, 1)
    qpos, kpos = positions(4)
    s = window_scores(query, key, qpos, kpos, window=2, scaling=1.0)
    # query 2 sees keys 0..2: weights 1/5, 1/5, 3/5 ; query 3 sees all: 1/6, 1/6, 3/6, 1/6
    expected = torch.tensor([1 / 5 + 1 / 6, 1 / 5 + 1 / 6, 3 / 5 + 3 / 6, 1 / 6])
    assert torch.allclose(s[0, 0], expected, atol=1e-6)


def test_attention_probs_groups_query_heads_onto_their_kv_head():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 3, 4), torch.randn(2, 2, 5, 4)
    qpos = torch.tensor([[2, 3, 4], [2, 3, 4]])
    _, kpos = positions(5, b=2, h=2)
    probs = attention_probs(q, k, qpos, kpos, 0.5)
    head = 4  # query head 4 uses KV head 1
    ref = ((q[:, head] @ k[:, 1].transpose(-1, -2)) * 0.5).masked_fill(
        torch.arange(5)[None, None] > qpos[:, :, None], float("-inf")
    )
    assert torch.allclose(probs[:, head], ref.softmax(-1), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6, 3))


def test_column_sums_equal_the_full_matrix_sum_in_any_block_size():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    qpos, kpos = positions(10, h=2)
    whole = attention_probs(q, k, qpos, kpos, 0.3).sum(2)
    assert torch.allclose(column_sums(q, k, qpos, kpos, 0.3, block=3), whole, atol=1e-6)
    assert torch.allclose(whole.sum(-1), torch.full((1, 4), 10.0))  # every query spends weight 1


def test_pooling_by_hand():
    s = torch.tensor([[[0.0, 3.0, 0.0, 0.0, 6.0]]])
    assert torch.allclose(pool1d(s, 3, "avg"), torch.tensor([[[1.0, 1.0, 1.0, 2.0, 2.0]]]))  # zero padding counts
    assert torch.equal(pool1d(s, 3, "max"), torch.tensor([[[3.0, 3.0, 3.0, 6.0, 6.0]]]))
    assert torch.equal(pool1d(s, 1, "max"), s)
    with pytest.raises(SqueezegenError, match="odd"):
        pool1d(s, 4)


def test_gqa_reduction_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [1.0, 1.0]]])  # 4 query heads, 2 KV heads
    assert torch.equal(reduce_gqa(s, 2, "sum"), torch.tensor([[[4.0, 6.0], [6.0, 1.0]]]))
    assert torch.equal(reduce_gqa(s, 2, "mean"), torch.tensor([[[2.0, 3.0], [3.0, 0.5]]]))
    assert torch.equal(reduce_gqa(s, 2, "max"), torch.tensor([[[3.0, 4.0], [5.0, 1.0]]]))


ALL = torch.ones(1, 1, 1, dtype=torch.bool)


def test_keep_top_keeps_the_window_and_the_best_per_head():
    s = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 0.0, 0.0], [0.0, 9.0, 1.0, 8.0, 0.0, 0.0]]])
    real = ALL.expand(1, 2, 6)
    assert keep_top(s, real, [4], [2]).tolist() == [[[0, 2, 4, 5], [1, 3, 4, 5]]]
    assert keep_top(s, real, [6], [2]).tolist() == [[list(range(6))] * 2]


def test_keep_top_decides_per_row_on_real_entries_only():
    # row 1 holds row 0's first six scores behind two padding slots, with a smaller budget: a -1
    # where it keeps fewer; padding is never kept, even when it scores highest
    row = [5.0, 1.0, 4.0, 2.0, 0.0, 0.0]
    s = torch.tensor([[row + [3.0, 3.0]], [[9.0, 9.0] + row]])
    real = torch.tensor([[[True] * 8], [[False, False] + [True] * 6]])
    assert keep_top(s, real, [5, 4], [2, 2]).tolist() == [[[0, 2, 3, 6, 7]], [[2, 4, 6, 7, -1]]]
    # a row whose budget holds all its entries keeps all of them, and nothing else
    assert keep_top(s, real, [3, 8], [1, 1]).tolist()[1] == [[2, 3, 4, 5, 6, 7, -1, -1]]


def test_keep_top_breaks_ties_towards_the_earlier_entry():
    s = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 0.0]]])
    assert keep_top(s, ALL.expand(1, 1, 5), [3], [1]).tolist() == [[[1, 2, 4]]]


def test_chunked_selection_keeps_whole_chunks_counted_from_the_first_real_entry():
    # chunks of 2 over the first 6 positions: sums 1.5, 10, 2 ; window = last 2 positions
    s = torch.tensor([[[1.5, 0.0, 0.0, 10.0, 1.0, 1.0, 0.0, 0.0]]])
    real = ALL.expand(1, 1, 8)
    assert keep_top(s, real, [4], [2], chunk=2).tolist() == [[[2, 3, 6, 7]]]
    assert keep_top(s, real, [6], [2], chunk=2).tolist() == [[[2, 3, 4, 5, 6, 7]]]
    # plain top-k would take the single best tokens instead
    assert keep_top(s, real, [4], [2]).tolist() == [[[0, 3, 6, 7]]]
    # one padding slot in front: the chunks still start at the first real entry
    padded = torch.cat([torch.full((1, 1, 1), 7.0), s], dim=-1)
    real = torch.cat([torch.zeros(1, 1, 1, dtype=torch.bool), real], dim=-1)
    assert keep_top(padded, real, [4], [2], chunk=2).tolist() == [[[3, 4, 7, 8]]]


def test_budget_resolution_and_errors():
    assert resolve_budget(0.25, 4000) == 1000
    assert resolve_budget(1.0, 4000) == 4000
    assert resolve_budget(512, 4000) == 512
    assert resolve_budget(5000, 4000) == 4000  # a prompt within the budget keeps everything
    for bad, message in [
        (1.5, r"\(0, 1\]"),
        (0, "at least 1"),
        ("big", "token count"),
    ]:
        with pytest.raises(SqueezegenError, match=message):
            resolve_budget(bad, 4000)


def test_scores_are_shared_only_by_configurations_that_score_alike():
    """Configurations of one prefill share a layer's scores when they differ only in how they
    choose (the budget); any other field, a new one of a subclass included, keys its own scores."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from squeezegen.methods.snapkv import SnapKV

    @dataclass
    class Scaled(SnapKV):
        factor: float = 1.0  # a scoring field nobody listed: it must split the sharing

        def score(self, view, query, key):
            return super().score(view, query, key) * self.factor

    torch.manual_seed(0)
    query, key = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    query_pos, key_pos = positions(8)
    view = SimpleNamespace(memo={}, key_pos=key_pos, positions=query_pos, scaling=0.5)
    calls = []

    def scored(method):
        before = len(view.memo)
        out = method.kv_scores(view, query, key)
        calls.append(len(view.memo) > before)
        return out

    scored(SnapKV(budget=4, window=2))
    scored(SnapKV(budget=6, window=2, floor=0.5, heads="shared"))  # the choice only: shared
    scored(SnapKV(budget=4, window=3))  # another observation window: its own scores
    first = scored(Scaled(budget=4, window=2, factor=1.0))
    second = scored(Scaled(budget=4, window=2, factor=2.0))
    assert calls == [True, False, True, True, True]
    assert not torch.equal(first, second)
