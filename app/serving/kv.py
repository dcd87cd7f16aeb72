"""The running batch's key/value cache, padded on the left so rows of any length decode together.

Row ``i`` of a batch of cache length ``L`` holds its tokens in the last ``lengthᵢ`` positions; the
2-D attention mask marks the padding, and each row's position ids count only its own tokens, so a
row computes exactly what it would alone. New rows join by padding the shorter side on the left
(:func:`concat`); finished rows leave by selection, after which columns that are padding for every
remaining row are dropped (:func:`select`). This is how TGI's first Python server batched
continuously on stock transformers models.

Each layer keeps its keys and values in preallocated room (:class:`RoomyLayer`): a decode step
writes one column instead of copying the whole cache, as ``DynamicLayer``'s concatenation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

SPARE = 64  # columns of room allocated beyond the current length


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values live in a buffer with spare columns (doubling
    when full); ``keys``/``values`` are views of the filled part."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def assign(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE) -> None:
        """Hold ``keys``/``values`` ``(batch, heads, length, dim)`` with room for ``spare`` more columns."""
        length = keys.shape[2]
        self._k = keys.new_empty((keys.shape[0], keys.shape[1], length + spare, keys.shape[3]))
        self._v = values.new_empty((values.shape[0], values.shape[1], length + spare, values.shape[3]))
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._length = length
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            self.assign(key_states, value_states, spare=max(SPARE, key_states.shape[2]))
        else:
            new = key_states.shape[2]
            end = self._length + new
            if end > self._k.shape[2]:
                self.assign(self._k[:, :, :self._length], self._v[:, :, :self._length],
                            spare=max(new, self._k.shape[2]))
                assert self._k is not None and self._v is not None
            self._k[:, :, self._length:end] = key_states
            self._v[:, :, self._length:end] = value_states
            self._length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


def new_cache() -> DynamicCache:
    """An empty cache whose layers are :class:`RoomyLayer` (made as the model first writes each)."""
    cache = DynamicCache()
    Cache.__init__(cache, layer_class_to_replicate=RoomyLayer)
    return cache


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


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values (full-attention layers only)."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding or layer.keys is None or layer.values is None:
            raise TypeError(f"continuous batching needs filled full-attention cache layers, got {type(layer).__name__}")
        out.append((layer.keys, layer.values))
    return out


def _from_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = new_cache()
    for keys, values in pairs:
        layer = RoomyLayer()
        layer.assign(keys, values)
        cache.layers.append(layer)
    return cache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


def concat(a: BatchKV, b: BatchKV) -> BatchKV:
    """Rows of ``a`` then rows of ``b`` in one batch (the shorter one padded on the left)."""
    length = max(a.length, b.length)
    pad_a, pad_b = length - a.length, length - b.length
    pairs = [
        (torch.cat([_pad_left(ka, pad_a, 2), _pad_left(kb, pad_b, 2)]),
         torch.cat([_pad_left(va, pad_a, 2), _pad_left(vb, pad_b, 2)]))
        for (ka, va), (kb, vb) in zip(_tensors(a.cache), _tensors(b.cache), strict=True)
    ]
    mask = torch.cat([_pad_left(a.mask, pad_a, 1), _pad_left(b.mask, pad_b, 1)])
    return BatchKV(_from_tensors(pairs), mask, torch.cat([a.positions, b.positions]))


def select(kv: BatchKV, rows: list[int]) -> BatchKV:
    """Keep ``rows`` (in that order), dropping leading columns that are padding for all of them."""
    index = torch.tensor(rows, dtype=torch.long, device=kv.mask.device)
    mask = kv.mask.index_select(0, index)
    seen = mask.any(dim=0)
    start = int(seen.nonzero()[0]) if bool(seen.any()) else mask.shape[1]
    pairs = [(keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
             for keys, values in _tensors(kv.cache)]
    return BatchKV(_from_tensors(pairs), mask[:, start:], kv.positions.index_select(0, index))


def append_step(kv: BatchKV) -> torch.Tensor:
    """Extend the mask by one real token per row (the decode step's input); returns the new mask."""
    ones = torch.ones((kv.batch_size, 1), dtype=kv.mask.dtype, device=kv.mask.device)
    kv.mask = torch.cat([kv.mask, ones], dim=1)
    return kv.mask
