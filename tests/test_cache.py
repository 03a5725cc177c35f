"""The KV cache by hand: slots, positions (-1 = empty), the two phases, bytes."""

import torch

from squeezegen.runtime.cache import EMPTY, KVCache, LayerCache, compact_index


def entries(n, start=0, b=1, h=2, d=3):
    """Keys whose every element is the token's position: easy to read back."""
    pos = torch.arange(start, start + n)
    k = pos.float()[None, None, :, None].expand(b, h, n, d).clone()
    return k, -k, pos[None].expand(b, n)


def test_compact_index_pads_rows_that_keep_fewer():
    keep = torch.tensor([[[True, False, True, True], [False, False, True, False]]])
    assert compact_index(keep).tolist() == [[[0, 2, 3], [2, -1, -1]]]
    assert compact_index(keep, empty_first=True).tolist() == [[[0, 2, 3], [-1, -1, 2]]]


def test_prefill_holds_the_first_chunk_and_appends_in_order():
    cache = LayerCache()
    k, v, p = entries(3)
    cache.append(k, v, p)
    assert cache.keys is k  # the prefill's own tensor, no copy
    cache.append(*entries(2, start=3))
    keys, values, pos = cache.held()
    assert cache.used == 5 and torch.equal(keys[0, 0, :, 0], torch.arange(5).float())
    assert torch.equal(values, -keys) and torch.equal(pos[0, 1], torch.arange(5))


def test_keep_gathers_per_kv_head_and_marks_missing_entries_empty():
    cache = LayerCache()
    cache.append(*entries(6, b=2))
    # row 0 keeps 3 entries per head, row 1 only 2 (its third index is -1)
    cache.keep(torch.tensor([[[0, 2, 5], [1, 4, 5]], [[3, 4, -1], [0, 1, -1]]]), room=1)
    k, _, p = cache.held()
    assert p.tolist() == [[[0, 2, 5, EMPTY], [1, 4, 5, EMPTY]], [[3, 4, EMPTY, EMPTY], [0, 1, EMPTY, EMPTY]]]
    assert torch.equal(k[0, :, :3, 0], torch.tensor([[0.0, 2, 5], [1, 4, 5]]))
    assert cache.live().tolist() == [[3, 3], [2, 2]]


def test_sliding_window_prefill_keeps_what_the_next_token_can_see_per_row():
    cache = LayerCache()
    cache.window = 4
    k, v, _ = entries(6, b=2)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]])  # row 1 is left-padded
    cache.append(k, v, positions)
    cache.drop_out_of_view(torch.tensor([6, 4]))
    # the token at 6 sees 3..5 (and itself), the one at 4 sees 1..3
    assert cache.held()[2][:, 0].tolist() == [[3, 4, 5], [1, 2, 3]]


def test_decode_buffer_fills_empty_slots_first_then_the_room_after():
    cache = LayerCache()
    k, v, _ = entries(3, b=2, h=1)
    cache.append(k, v, torch.tensor([[0, 1, 2], [-1, 0, 1]]))
    cache.to_static(5)
    assert cache.used == 5 and cache.pos.tolist() == [[[0, 1, 2, -1, -1]], [[-1, 0, 1, -1, -1]]]
    for step in range(2):
        new = torch.full((2, 1, 1, 3), 10.0 + step)
        cache.write(new, -new, torch.tensor([3 + step, 2 + step]))
    # row 1 took its padding slot first, then the room
    assert cache.pos.tolist() == [[[0, 1, 2, 3, 4]], [[2, 0, 1, 3, -1]]]
    assert cache.keys[1, 0, 0, 0] == 10.0 and cache.values[1, 0, 3, 0] == -11.0


def test_sliding_window_decode_is_a_ring():
    cache = LayerCache()
    cache.window = 3
    cache.append(*entries(2, b=1, h=1))
    cache.to_static(3)
    for pos in range(2, 9):
        cache.write(*entries(1, start=pos, h=1)[:2], torch.tensor([pos]))
        assert sorted(cache.pos[0, 0].tolist()) == [x for x in range(pos - 2, pos + 1) if x >= 0][-3:]


def test_evict_marks_one_slot_per_row_where_asked():
    cache = LayerCache()
    cache.append(*entries(4, b=2, h=1))
    cache.to_static(4)
    cache.evict(torch.tensor([[1], [2]]), torch.tensor([[True], [False]]))
    assert cache.pos[:, 0].tolist() == [[0, -1, 2, 3], [0, 1, 2, 3]]
    cache.grow(2)  # more room at the end; slots keep their places
    assert cache.pos[:, 0].tolist() == [[0, -1, 2, 3, -1, -1], [0, 1, 2, 3, -1, -1]]


def test_bytes_count_the_buffers_held_and_the_peak():
    cache = KVCache(num_layers=2)
    cache.layers[0].append(*entries(10, b=1, h=2, d=3))
    cache.note_peak()
    cache.layers[1].append(*entries(10, b=1, h=2, d=3))
    cache.note_peak()
    per_layer = 2 * 1 * 2 * 10 * 3 * 4  # keys+values, B, Hkv, T, D, fp32
    assert cache.nbytes() == 2 * per_layer
    cache.layers[1].keep(torch.tensor([[[0, 1]]]))
    assert cache.nbytes() == per_layer + per_layer // 5
    assert cache.peak_bytes == 2 * per_layer
    cache.layers[1].to_static(4)  # empty decode slots are held memory too
    assert cache.nbytes() == per_layer + 2 * per_layer // 5
    assert cache.lengths() == [10, 2]
