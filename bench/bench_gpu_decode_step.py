"""One 32-row decode step on a GPU: the base model vs 32 adapters in slots, in time and in operator calls.

The diagnostic behind ``bench_serving.py --device cuda``'s target 2 (32 adapters vs the base). On the
GPU spec's model (bfloat16, 95M parameters) with 32 LoRA r=16 all-linear adapters in slots, after a
prefill of 32 rows on a cache, it times decode steps of those rows routed to the base model (slot 0)
and to their 32 adapters (best of 3 rounds), the adapters' products through torch's operators and,
where it runs (CUDA devices with Triton), through the fused kernel of ``adapters_core.serving.gpu_bgmv``;
then counts the torch operators (and, on a GPU, the
kernels) one step of each launches; the fused kernel's warm-up at start (every compiled variant, into
an empty Triton cache, then again compiled); and the parts of the 32 adapters' cold loads into their
slots (read, prepare on the host, copy into the slot). A small model's decode step is bound by launching work, not by
the GPU: the counts say what the adapter path adds. No server, no ``peft``; ~40 s on an H200.

    python bench/bench_gpu_decode_step.py [--device cuda] [--steps 30]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from bench_serving import SPECS, make_adapters  # noqa: E402

from adapters_core.peft_format import read_adapter  # noqa: E402
from adapters_core.serving import SlottedModel  # noqa: E402
from adapters_core.serving.layers import SlotLoraLayer  # noqa: E402
from adapters_core.tiny_models import build_tiny_llama  # noqa: E402

logger = logging.getLogger("bench_gpu_decode_step")
ROWS = 32


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_allocation_costs(prepared: Any) -> dict[str, Any]:
    """Seconds to allocate ``prepared``'s host tensors again, pageable and pinned (what prepare allocates
    when CUDA is present), each round's tensors kept alive, so that pinned memory cannot come from
    torch's cache of freed pinned blocks: the case of a server whose host tier holds earlier adapters."""
    shapes = [(tuple(t.shape), t.dtype) for w in prepared.layers.values() for t in w.tensors()]
    out: dict[str, Any] = {"count": (len(shapes), sum(math.prod(s) * d.itemsize for s, d in shapes) / 1e6)}
    for pinned in (False, True):
        held, times = [], []
        for _ in range(8):
            t0 = time.perf_counter()
            held.append([torch.empty(shape, dtype=dtype, pin_memory=pinned) for shape, dtype in shapes])
            times.append(time.perf_counter() - t0)
        out["pinned" if pinned else "pageable"] = statistics.median(times)
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(prefix="bench_gpu_decode_step_") as tmp:
        work = Path(tmp)
        build_tiny_llama(work / "model", SPECS["gpu"], seed=0)
        folders = make_adapters(work / "model", work / "adapters", ROWS, dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
        # Triton compiles into an empty cache, as on a fresh server (the compiled variants stay in it)
        os.environ["TRITON_CACHE_DIR"] = str(work / "triton-cache")
        sm = SlottedModel(model.to(device).eval(), ROWS, cpu_kernels=False)
        fused = sm.gpu_kernel  # the fused decode kernel, where it runs (CUDA devices with Triton)
        warm_up: list[tuple[int, float]] = []  # (launches, seconds): the server's start, cold then compiled
        for _ in range(2 if fused is not None else 0):
            t0 = time.perf_counter()
            made = sm.warm_up_gpu_kernel()
            sync(device)
            warm_up.append((made, time.perf_counter() - t0))
        cold: dict[str, list[float]] = {"read": [], "prepare": [], "copy into the slot": []}
        for slot, folder in enumerate(folders, start=1):  # cold loads, timed in their parts
            t0 = time.perf_counter()
            config, tensors = read_adapter(folder)
            t1 = time.perf_counter()
            prepared = sm.prepare(config, tensors)
            t2 = time.perf_counter()
            sm.load(slot, prepared)
            sync(device)
            for key, seconds in zip(cold, (t1 - t0, t2 - t1, time.perf_counter() - t2), strict=True):
                cold[key].append(seconds)
        allocation = host_allocation_costs(prepared) if device.startswith("cuda") else {}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (ROWS, 24), generator=gen).to(device)
    token = torch.randint(3, 300, (ROWS, 1), generator=gen).to(device)

    def steps(slots: list[int], n: int) -> float:
        """Seconds per decode step of the 32 rows on ``slots`` (after a prefill and 3 untimed steps)."""
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(slots):
                sm.model(input_ids=ids, past_key_values=cache, use_cache=True)
                for _ in range(3):
                    sm.model(input_ids=token, past_key_values=cache, use_cache=True)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    sm.model(input_ids=token, past_key_values=cache, use_cache=True)
                sync(device)
        return (time.perf_counter() - t0) / n

    def launches(slots: list[int]) -> tuple[int, int]:
        """Top-level torch operators and GPU kernels of one decode step on ``slots``."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(slots):
                sm.model(input_ids=ids, past_key_values=cache, use_cache=True)
                sm.model(input_ids=token, past_key_values=cache, use_cache=True)
                sync(device)
                with profile(activities=activities) as prof:
                    sm.model(input_ids=token, past_key_values=cache, use_cache=True)
                    sync(device)
        events = prof.events()
        operators = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
        kernels_ = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return operators, kernels_

    def per_call(fn: Any, n: int = 300) -> float:
        """Microseconds per call of ``fn`` over ``n`` calls, synchronized only at the end (the host's rate)."""
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n * 1e6

    def one_layer_costs() -> dict[str, float]:
        """One LoRA layer's product for the 32 rows (the first q_proj), by each path: µs per call."""
        from adapters_core.serving.kernels import RowIndex, lora_delta_bank_step

        layer = next(m for m in sm.model.modules() if isinstance(m, SlotLoraLayer))
        assert layer.a is not None and layer.b is not None and layer._flat_bank is not None
        x = torch.randn(ROWS, 1, layer.info.in_features, device=device, dtype=dtype)
        out = torch.zeros(ROWS, 1, layer.info.out_features, device=device, dtype=dtype)
        slots = torch.tensor(own, device=device)
        width, index = layer.rank_capacity, RowIndex(slots)  # (a forward's layers share its indices)
        costs = {"torch (6 operators)": per_call(
            lambda: lora_delta_bank_step(x, *layer._flat_bank, index, width, out))}
        if fused is not None:
            costs["fused (1 launch)"] = per_call(lambda: fused.step(x, layer.a, layer.b, slots, width, out))
        costs["one torch add_, for scale"] = per_call(lambda: out.add_(1.0))
        return costs

    n_layers = sum(isinstance(m, SlotLoraLayer) for m in sm.model.modules())
    base, own = [0] * ROWS, list(range(1, ROWS + 1))
    contenders = {"base": (base, None), "adapters, torch": (own, None)}
    if fused is not None:
        contenders["adapters, fused"] = (own, fused)
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(3):  # rounds, interleaved against drift
        for key, (slots, kernel) in contenders.items():
            sm.use_gpu_kernel(kernel)
            times[key].append(steps(slots, args.steps))
    best = {k: min(v) * 1e3 for k, v in times.items()}
    calls = {}
    for key, (slots, kernel) in contenders.items():
        sm.use_gpu_kernel(kernel)
        calls[key] = launches(slots)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    logger.info("decode step, %d rows, %s on %s (%s), best of 3 x %d steps:", ROWS, dtype, device, name, args.steps)
    for key in contenders:
        logger.info("  %-16s %7.2f ms   %4d torch operators, %4d GPU kernels per step", key, best[key],
                    *calls[key])
    if fused is None:
        logger.info("  (no fused kernel here: it runs on CUDA devices with Triton)")
    if warm_up:
        logger.info("  the fused kernel's warm-up at start (every variant up to max_rank %d): %d launches, %.2f s "
                    "with an empty Triton cache, %.3f s once compiled", sm.max_rank, warm_up[0][0], warm_up[0][1],
                    warm_up[1][1])
    logger.info("  cold load of one adapter (medians of %d, the first wraps the model): %s", ROWS - 1,
                ", ".join(f"{k} {statistics.median(v[1:]) * 1e3:.2f} ms" for k, v in cold.items()))
    if allocation:
        logger.info("  allocating one adapter's host buffers as prepare does (%d tensors, %.1f MB; the earlier "
                    "ones kept, as the host tier keeps them; medians of 8): %s", *allocation["count"],
                    ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in allocation.items() if k != "count"))
    logger.info("  one LoRA layer's product, 32 rows (us per call, host rate): %s",
                ", ".join(f"{k} {v:.1f}" for k, v in one_layer_costs().items()))
    for key in contenders:
        if key == "base":
            continue
        extra = best[key] - best["base"]
        logger.info("  %s: adds %.2f ms per step (%.0f us per LoRA layer); base/adapters %.2f; %d more operators, "
                    "%d more GPU kernels", key, extra, extra * 1e3 / n_layers, best["base"] / best[key],
                    calls[key][0] - calls["base"][0], calls[key][1] - calls["base"][1])


if __name__ == "__main__":
    main()
