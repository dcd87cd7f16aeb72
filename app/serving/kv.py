"""The running batch's key/value cache, padded on the left so rows of any length decode together.

Row ``i`` of a batch of cache length ``L`` holds its tokens in the last ``lengthᵢ`` positions; the
2-D attention mask marks the padding, and each row's position ids count only its own tokens, so a
row computes exactly what it would alone. New rows join by padding the shorter side on the left
(:func:`concat`); finished rows leave by selection, after which columns that are padding for every
remaining row are dropped (:func:`select`). This is how TGI's first Python server batched
continuously on stock transformers models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class BatchKV:
    """Cache, attention mask ``(batch, L)`` and next position id ``(batch,)`` of the running rows."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def _tensors(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each layer with its keys and values (full-attention dynamic layers only)."""
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise TypeError(f"continuous batching needs filled full-attention cache layers, got {type(layer).__name__}")
        out.append((layer, layer.keys, layer.values))
    return out


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


def concat(a: BatchKV, b: BatchKV) -> BatchKV:
    """Rows of ``a`` then rows of ``b`` in one batch (the shorter one padded on the left)."""
    length = max(a.length, b.length)
    pad_a, pad_b = length - a.length, length - b.length
    cache = DynamicCache()
    for (_, ka, va), (_, kb, vb) in zip(_tensors(a.cache), _tensors(b.cache), strict=True):
        keys = torch.cat([_pad_left(ka, pad_a, 2), _pad_left(kb, pad_b, 2)])
        values = torch.cat([_pad_left(va, pad_a, 2), _pad_left(vb, pad_b, 2)])
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    mask = torch.cat([_pad_left(a.mask, pad_a, 1), _pad_left(b.mask, pad_b, 1)])
    return BatchKV(cache, mask, torch.cat([a.positions, b.positions]))


def select(kv: BatchKV, rows: list[int]) -> BatchKV:
    """Keep ``rows`` (in that order), dropping leading columns that are padding for all of them."""
    index = torch.tensor(rows, dtype=torch.long, device=kv.mask.device)
    mask = kv.mask.index_select(0, index)
    seen = mask.any(dim=0)
    start = int(seen.nonzero()[0]) if bool(seen.any()) else mask.shape[1]
    for layer, keys, values in _tensors(kv.cache):
        layer.keys = keys.index_select(0, index)[:, :, start:]
        layer.values = values.index_select(0, index)[:, :, start:]
    return BatchKV(kv.cache, mask[:, start:], kv.positions.index_select(0, index))


def append_step(kv: BatchKV) -> torch.Tensor:
    """Extend the mask by one real token per row (the decode step's input); returns the new mask."""
    ones = torch.ones((kv.batch_size, 1), dtype=kv.mask.dtype, device=kv.mask.device)
    kv.mask = torch.cat([kv.mask, ones], dim=1)
    return kv.mask
