"""How much page-locked host memory the adapter host tier holds on a GPU machine, against its setting.

The bank (``app.serving.bank``) counts each cached adapter's tensors as torch's pinned allocator holds them
(each block rounded up to a power of two), and drops the least recently used past
``ADAPTERFORGE_ADAPTER_HOST_CACHE_BYTES``. The allocator keeps freed blocks for reuse, but reuses a block only
for a tensor of the same size class: adapters of several ranks can each fill the tier once. This script passes
adapters of ranks 64, 32, 16 and 8 (32 layers of 4096 x r, bfloat16) through a bank of a 256 MiB tier and
prints, after each rank, what the bank counts and what the allocator holds
(``torch.cuda.host_memory_stats()``). No GPU: nothing is pinned, and it says so.

    python bench/check_pinned_host_tier.py
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from adapters_core.serving.layers import SlotWeights  # noqa: E402
from adapters_core.serving.prepare import PreparedAdapter, _slot_weight  # noqa: E402
from app.serving.bank import AdapterBank  # noqa: E402

logger = logging.getLogger("check_pinned_host_tier")

CAPACITY = 256 * 2**20
LAYERS, HIDDEN = 32, 4096


def adapter(rank: int, pin: bool) -> PreparedAdapter:
    layers = {}
    for i in range(LAYERS):
        a = torch.randn(rank, HIDDEN, dtype=torch.bfloat16)
        b = torch.randn(HIDDEN, rank, dtype=torch.bfloat16)
        layers[f"l{i}"] = SlotWeights(a=_slot_weight(a, None, torch.bfloat16, "a", pin=pin),
                                      b=_slot_weight(b, 2.0, torch.bfloat16, "b", pin=pin))
    return PreparedAdapter(None, layers)  # type: ignore[arg-type]


def allocator_bytes() -> dict[str, Any]:
    stats = torch.cuda.host_memory_stats()
    return {k: v for k, v in stats.items() if "bytes" in k and k.endswith("current")}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pin = torch.cuda.is_available()
    if not pin:
        logger.info("no CUDA device: nothing is pinned (the bank's count below is plain host memory)")
    bank = AdapterBank(types.SimpleNamespace(num_slots=4), host_capacity_bytes=CAPACITY)  # type: ignore[arg-type]
    for rank in (64, 32, 16, 8):
        for n in range(12):  # 12 x 32 MiB at rank 64: past the tier, the LRU drops the oldest
            bank.release(bank.fetch(f"r{rank}-{n}", f"r{rank}-{n}", lambda rank=rank: adapter(rank, pin)))
        held = allocator_bytes() if pin else "n/a"
        logger.info("after rank %2d: the bank counts %4.0f MiB (tier %d MiB); the pinned allocator holds %s",
                    rank, bank.host_bytes / 2**20, CAPACITY // 2**20, held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
