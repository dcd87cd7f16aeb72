"""State shared by one :class:`~adapters_core.model.AdapterModel` and every adapter layer inside it.

Layers read the active adapters and the per-row routing from this one object instead of holding
copies, so switching adapters is an attribute write, not a walk over modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE_ADAPTER = "__base__"
"""Row name meaning "no adapter" in ``adapter_names``."""


@dataclass(frozen=True)
class RowRouting:
    """Which adapter each row of the current batch uses.

    ``slots[i]`` is the slot id of row ``i``'s adapter (0 = base model); ``slot_set`` holds the
    distinct ids and ``names`` the adapter names, in row order.
    """

    slots: torch.Tensor
    slot_set: frozenset[int]
    names: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return len(self.names)


@dataclass
class AdapterState:
    """Mutable routing state of one adapter model."""

    active: tuple[str, ...] = ()
    disabled: bool = False
    rows: RowRouting | None = None
    slots: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    """Bumped whenever adapters are added, removed, merged or unmerged; layer caches key on it."""

    def assign_slot(self, name: str) -> int:
        """Give ``name`` the lowest free slot id (ids start at 1; 0 is the base model)."""
        used = set(self.slots.values())
        slot = 1
        while slot in used:
            slot += 1
        self.slots[name] = slot
        self.epoch += 1
        return slot

    def release_slot(self, name: str) -> None:
        self.slots.pop(name, None)
        self.epoch += 1

    @property
    def num_slots(self) -> int:
        """Size of a slot-indexed bank (highest id + 1)."""
        return max(self.slots.values(), default=0) + 1
