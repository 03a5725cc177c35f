"""sign(W) stored at one bit per weight: 8 signs per byte along each row, +1 as a set bit.

Bit j of byte b in a row holds the sign of column 8*b + j; rows whose length is not a multiple of
8 end in a partly used byte. Unpacking is one table lookup per byte (a 256 x 8 table of +-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) real weights -> (rows, ceil(cols / 8)) uint8; w >= 0 is stored as +1."""
    rows, cols = weight.shape
    bits = (weight >= 0).to(torch.uint8)
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=weight.device)
    padded[:, :cols] = bits
    return (padded.view(rows, -1, 8) * _BITS.to(weight.device)).sum(dim=-1, dtype=torch.uint8)


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row i: the eight signs of byte value i, as +-1 of `dtype`."""
    bits = (torch.arange(256, dtype=torch.uint8)[:, None] & _BITS) > 0
    return (bits.to(dtype) * 2 - 1).to(device)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def unpack_signs(packed: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, nbytes) uint8 -> (rows, cols) tensor of +-1 in `dtype`."""
    key = (dtype, packed.device)
    if key not in _TABLES:
        _TABLES[key] = _table(dtype, packed.device)
    # an embedding lookup of the bytes: ~4x faster than advanced indexing on CPU
    return F.embedding(packed.long(), _TABLES[key]).view(packed.shape[0], -1)[:, :cols]
