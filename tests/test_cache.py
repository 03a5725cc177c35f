import torch

from squeezegen.runtime.cache import WINDOW_SLACK, KVCache, LayerCache


def entries(n, start=0, b=1, h=2, d=3):
    """Keys whose every element is the token's position: easy to read back."""
    pos = torch.arange(start, start + n)
    k = pos.float()[None, None, :, None].expand(b, h, n, d).clone()
    return k, -k, pos[None].expand(b, n)


def test_append_grows_and_keeps_order():
    cache = LayerCache(reserve=2)
    cache.append(*entries(3))
    assert cache.keys.shape[2] == 3  # the prefill's own tensors, no copy
    cache.append(*entries(2, start=3))
    assert cache.keys.shape[2] == 3 + 2 + 2  # moved to a buffer with the reserve free
    cache.append(*entries(4, start=5))  # past the reserve: the buffer grows
    k, v, p = cache.view()
    assert cache.length == 9
    assert torch.equal(k[0, 0, :, 0], torch.arange(9).float())
    assert torch.equal(v, -k)
    assert torch.equal(p[0, 1], torch.arange(9))


def test_keep_gathers_per_kv_head():
    cache = LayerCache()
    cache.append(*entries(6))
    cache.keep(torch.tensor([[[0, 2, 5], [1, 4, 5]]]))
    k, _, p = cache.view()
    assert torch.equal(k[0, :, :, 0], torch.tensor([[0.0, 2, 5], [1, 4, 5]]))
    assert torch.equal(p[0], torch.tensor([[0, 2, 5], [1, 4, 5]]))
    assert not cache.shared_heads
    # the same selection for every head keeps the heads' positions shared
    shared = LayerCache()
    shared.append(*entries(6))
    shared.keep(torch.tensor([[[1, 3]]]))
    assert shared.shared_heads and torch.equal(shared.view()[2][0, 1], torch.tensor([1, 3]))


def test_padding_is_tracked():
    cache = LayerCache()
    k, v, _ = entries(4)
    cache.append(k, v, torch.tensor([[-1, 0, 1, 2]]))
    assert cache.padded
    cache.keep(torch.tensor([[[1, 2, 3]]]))
    assert not cache.padded


def test_sliding_window_keeps_what_the_next_token_can_see():
    cache = LayerCache(reserve=0)
    cache.window = 4
    cache.append(*entries(10))
    cache.drop_out_of_window()
    assert torch.equal(cache.view()[2][0, 0], torch.tensor([7, 8, 9]))  # window - 1 entries
    assert cache.keys.shape[2] == 3 + WINDOW_SLACK
    for pos in range(10, 10 + WINDOW_SLACK + 5):  # fill the slack: the buffer compacts itself
        cache.append(*entries(1, start=pos))
    kept = cache.view()[2][0, 0]
    assert kept[-1] == 10 + WINDOW_SLACK + 4 and cache.length <= 3 + WINDOW_SLACK
    assert torch.equal(kept, torch.arange(kept[0], kept[-1] + 1))


def test_bytes_and_peak():
    cache = KVCache(num_layers=2, reserve=100)
    cache.layers[0].append(*entries(10, b=1, h=2, d=3))
    cache.note_peak()
    cache.layers[1].append(*entries(10, b=1, h=2, d=3))
    cache.note_peak()
    per_layer = 2 * 1 * 2 * 10 * 3 * 4  # keys+values, B, Hkv, T, D, fp32
    assert cache.nbytes() == 2 * per_layer  # buffer slack (reserve) is not counted
    cache.layers[1].keep(torch.tensor([[[0, 1]]]))
    assert cache.nbytes() == per_layer + per_layer // 5
    assert cache.peak_bytes == 2 * per_layer
    assert cache.lengths() == [10, 2]
