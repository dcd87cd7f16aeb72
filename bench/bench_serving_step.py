"""Where one decode step's time goes when 32 rows use 32 different adapters: the diagnostic behind
target 2 of ``bench_serving.py`` (adapter throughput >= 0.85 of the base model's).

No server and no ``peft`` in the timed part: the bench model of ``bench_serving.py`` in a
:class:`~adapters_core.serving.SlottedModel` of 64 slots, with row buffers for 64 rows as a server
without the compiled kernel lays it out, 32 adapters loaded, a batch of 32 rows prefilled with
48-token prompts, then decode steps of six kinds, interleaved so that a machine slowing down moves
all of them:

* ``base``: every row on the base model (no adapter work at all);
* ``adapters``: row ``i`` on adapter ``i`` (what the server does: the compiled CPU kernel of
  :mod:`adapters_core.serving.cpu_bgmv`, reading each row's weights from the slot bank by slot id,
  where it can be built);
* ``adapters, bmm``: the same with torch's ``bmm`` on the row buffers (the server's path without the
  kernel);
* ``base + reading``: the base step, plus, in every adapted layer, a ``sum`` of the very row
  buffers the adapter step multiplies (a forward hook): the cost of only bringing those weights
  through the caches, in place, with torch's plainest read;
* ``adapters, products skipped``: the adapter step with a stand-in kernel that leaves the output as
  it is: everything the adapter path does besides its products (routing, checks, the calls);
* ``adapters, 8 shared by 32 rows``: rows on 8 adapters, 4 rows each, through the kernel (rows that
  share an adapter read the same weights from the bank, so they come from memory once per step);
* ``adapters, float16 weights`` (where the kernel is built): ``adapters`` with the kernel bound to
  float16 copies of the banks, as a server with ``ADAPTERFORGE_ADAPTER_DTYPE=float16`` runs it (the
  same float32 products from half the bytes).

Each step appends one token to every row (the cache grows by one column per step, as in the
server). Between the steps, outside the model: the adapter step's 28 products alone (the kernel on
the bank and on its float16 copy, and ``bmm`` on the row buffers: the same weights), and one read of the same number of bytes
as a single flat tensor (the machine's streaming floor: what a perfect kernel would pay with no other
work around it).

Then prefills of 1, 8 and 32 rows of 32 tokens, each row on its own adapter, as the engine runs
them (a fresh cache, the last logits only): on the base model, with the compiled kernel reading the
slot bank, with torch's gather + ``bmm``, and with the products skipped, interleaved.

Then an r=64 adapter is loaded into a slot no row uses (every layer's buffers grow to 64 rank
columns) and the base and adapter steps run again: the 32 r=16 rows must cost what they cost before
(a batch multiplies only the rank columns its own slots need). Then the first row moves to the r=64
adapter: through the kernel, each of the other 31 rows still multiplies only its own 16 rank columns;
the same step with the kernel told no slot ranks (every row multiplying the batch's largest rank, 64,
as before per-row ranks) runs interleaved with it, and so do the same two with torch's ``bmm`` on the
row buffers: in rank bands (the server without the kernel), and as one product at rank 64 (before
rank bands).

The report gives the median of each, the ratio base / adapters (the ceiling of target 2's ratio on
this machine, before HTTP adds the same cost to both sides) and the adapter time target 2 allows
per step at that level.

    python bench/bench_serving_step.py [--steps N] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _runner import add_common_arguments, run_bench

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from bench_serving import CLIENTS, SLOTS, SPECS, make_adapters  # noqa: E402

from adapters_core.tiny_models import build_tiny_llama  # noqa: E402

PROMPT_TOKENS = 48
TARGET = 0.85  # bench_serving's target 2
SHARED = "adapters, 8 shared by 32 rows"
HALF = "adapters, float16 weights"
KINDS = ("base", "adapters", "adapters, bmm", "base + reading", "adapters, products skipped", SHARED)
ALONE = ("products alone", "products alone, bmm", "products alone, float16 weights", "streaming floor")
MIXED = "adapters, r=64 in the bank"
WIDE_ROW = "adapters, one r=64 row"
WIDE_ROW_PADDED = "adapters, one r=64 row, every row at r=64"
WIDE_ROW_BMM = "adapters, one r=64 row, bmm"
WIDE_ROW_BMM_PADDED = "adapters, one r=64 row, bmm, every row at r=64"
WIDE_KINDS = (MIXED, WIDE_ROW, WIDE_ROW_PADDED, WIDE_ROW_BMM, WIDE_ROW_BMM_PADDED)
PREFILL_ROWS = (1, 8, 32)  # rows of a prefill, each on its own adapter
PREFILL_TOKENS = 32
PREFILL_KINDS = ("base", "kernel", "torch", "products skipped")
WIDE_RANK = 64


def _reading_hooks(model: torch.nn.Module, batch: int) -> list[Any]:
    """Forward hooks that read each adapted layer's first ``batch`` row buffers (A and B)."""
    from adapters_core.serving.layers import SlotLoraLayer

    def read(layer: SlotLoraLayer, *_: Any) -> None:
        assert layer.rows_a is not None and layer.rows_b is not None
        layer.rows_a[:batch].sum()
        layer.rows_b[:batch].sum()

    return [m.register_forward_hook(read) for m in model.modules()
            if isinstance(m, SlotLoraLayer) and m.rows_a is not None]


def _use_kernel(model: torch.nn.Module, kernel: Any) -> None:
    """Point every slot layer at ``kernel`` (``None``: ``bmm``), with the row views and bound bank calls it
    last had with that kernel (as in the server, where they last while the batch and the bank do:
    switching costs no re-binding). The calls are swapped too: a call left in place would keep running
    the kernel it was bound with."""
    from adapters_core.serving.layers import SlotLoraLayer

    for m in model.modules():
        if isinstance(m, SlotLoraLayer) and m._bgmv is not kernel:
            kept = m.__dict__.setdefault("_bench_state", {})
            kept[id(m._bgmv)] = (m._row_views, m._bank_calls)
            m._row_views, m._bank_calls = kept.get(id(kernel), (None, {}))
            m._bgmv = kernel


class _SkipProducts:
    """A stand-in for the loaded kernel whose calls add nothing: the adapter path minus its products."""

    def prepare_bank(self, a: torch.Tensor, b: torch.Tensor, width: int, *_: Any) -> _SkipCall:
        return _SkipCall()


class _BatchRankOnly:
    """The loaded kernel, bound without the slots' ranks: every row multiplies the call's full width (the
    batch's largest rank), as the kernel did before it read each row's own rank."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    def prepare_bank(self, a: torch.Tensor, b: torch.Tensor, width: int, *_: Any) -> Any:
        return self._kernel.prepare_bank(a, b, width)


class _HalfWeights:
    """The loaded kernel, bound to float16 copies of each bank: what a server with
    ``ADAPTERFORGE_ADAPTER_DTYPE=float16`` runs (same products in float32, half the bytes read)."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    def prepare_bank(self, a: torch.Tensor, b: torch.Tensor, width: int, *ranks: Any) -> Any:
        return self._kernel.prepare_bank(a.half(), b.half(), width, *ranks)


class _SkipCall:
    def accepts(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        return True

    def __call__(self, x: torch.Tensor, out: torch.Tensor, *_: Any) -> torch.Tensor:
        return out


def _wide_adapter(model_dir: Path, out: Path) -> Path:
    """An r=64 ``all-linear`` adapter (saved by ``peft``): 4x the rank of the bench's adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(r=WIDE_RANK, lora_alpha=WIDE_RANK, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from adapters_core.peft_format import read_adapter
    from adapters_core.serving import SlottedModel
    from adapters_core.serving.cpu_bgmv import load_bgmv
    from app.serving.kv import new_cache

    spec = SPECS["cpu"]
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        work = Path(tmp)
        build_tiny_llama(work / "model", spec, seed=0)
        folders = make_adapters(work / "model", work / "adapters", CLIENTS, torch.float32)
        wide = read_adapter(_wide_adapter(work / "model", work / "wide"))  # (config, tensors), in memory
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
        # row buffers as a server without the kernel has them (the bmm kind); the kernel is swapped in
        # for the other kinds (with it, a server allocates none: the kernel reads the bank)
        slotted = SlottedModel(model, SLOTS, row_capacity=SLOTS, cpu_kernels=False)
        for i, folder in enumerate(folders):
            slotted.load(i + 1, slotted.prepare(*read_adapter(folder)))
    slots = list(range(1, CLIENTS + 1))
    shared = [1 + i % 8 for i in range(CLIENTS)]  # 8 adapters, each on 4 rows spread over the batch
    slotted.sync_rows(slots)
    adapter_bytes = sum((m.rows_a[:CLIENTS].nbytes + m.rows_b[:CLIENTS].nbytes)
                        for m in model.modules() if getattr(m, "rows_a", None) is not None)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (CLIENTS, PROMPT_TOKENS), generator=gen)
    cache = new_cache()
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times: dict[str, list[float]] = {k: [] for k in (*KINDS, HALF, *ALONE, MIXED, "base, r=64 in the bank",
                                                     WIDE_ROW, WIDE_ROW_PADDED, WIDE_ROW_BMM, WIDE_ROW_BMM_PADDED,
                                                     *(f"prefill {n}, {kind}" for n in PREFILL_ROWS
                                                       for kind in PREFILL_KINDS))}
    layers = [m for m in model.modules() if getattr(m, "rows_a", None) is not None]
    inputs = [(torch.randn((CLIENTS, 1, m.rows_a.shape[1]), generator=gen),
               torch.zeros((CLIENTS, 1, m.rows_b.shape[2]))) for m in layers]
    flat = torch.cat([t[:CLIENTS].flatten() for m in layers for t in (m.rows_a, m.rows_b)])

    kernel = load_bgmv()
    calls = [kernel.prepare_bank(m.a, m.b, m.a.shape[2]) for m in layers] if kernel else []
    half_calls = [kernel.prepare_bank(m.a.half(), m.b.half(), m.a.shape[2]) for m in layers] if kernel else []
    routed = torch.tensor(slots)
    kinds = (*KINDS, HALF) if kernel else KINDS  # (float16 weights: only the kernel reads them as they are)

    def products(bound: list[Any]) -> float:
        if not bound:
            return float("nan")
        t0 = time.perf_counter()
        for call, (x, out) in zip(bound, inputs, strict=True):
            call(x, out, routed, CLIENTS)
        return time.perf_counter() - t0

    def products_bmm() -> float:
        t0 = time.perf_counter()
        for m, (x, out) in zip(layers, inputs, strict=True):
            out.baddbmm_(torch.bmm(x, m.rows_a[:CLIENTS]), m.rows_b[:CLIENTS])
        return time.perf_counter() - t0

    def streaming() -> float:
        t0 = time.perf_counter()
        flat.sum()
        return time.perf_counter() - t0

    skip = _SkipProducts()
    half_weights = _HalfWeights(kernel) if kernel else None
    batch_rank_only = _BatchRankOnly(kernel) if kernel else None
    wide_row = [SLOTS, *slots[1:]]  # the first row on the r=64 adapter (loaded into the last slot below)
    length = PROMPT_TOKENS
    synced = slots  # the rows whose weights the row buffers hold

    def step(kind: str) -> float:
        nonlocal length, synced
        if kind.startswith("adapters"):
            routed = shared if kind == SHARED else wide_row if kind.startswith(WIDE_ROW) else slots
        else:
            routed = [0] * CLIENTS
        chosen = {"adapters, bmm": None, "adapters, products skipped": skip, HALF: half_weights,
                  WIDE_ROW_PADDED: batch_rank_only, WIDE_ROW_BMM: None, WIDE_ROW_BMM_PADDED: None}.get(kind, kernel)
        if chosen is None and routed != synced and kind.startswith("adapters"):  # bmm reads the row buffers
            slotted.sync_rows(routed)
            synced = routed
        _use_kernel(model, chosen)
        hooks = _reading_hooks(model, CLIENTS) if kind == "base + reading" else []
        token = torch.randint(5, vocab - 1, (CLIENTS, 1), generator=gen)
        mask = torch.ones((CLIENTS, length + 1), dtype=torch.long)
        positions = torch.full((CLIENTS, 1), length, dtype=torch.long)
        t0 = time.perf_counter()
        with slotted.route(routed):
            if kind == WIDE_ROW_BMM_PADDED:  # as before rank bands: one product at the batch's largest rank
                routing = slotted.routing.current
                assert routing is not None and routing.bands
                slotted.routing.current = dataclasses.replace(routing, bands=())
            model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache})
        elapsed = time.perf_counter() - t0
        _use_kernel(model, kernel)
        for hook in hooks:
            hook.remove()
        length += 1
        return elapsed

    def prefill(kind: str, prompt: torch.Tensor) -> float:
        routed = [0] * prompt.shape[0] if kind == "base" else list(range(1, prompt.shape[0] + 1))
        _use_kernel(model, {"torch": None, "products skipped": skip}.get(kind, kernel))
        t0 = time.perf_counter()
        with slotted.route(routed):
            model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_arg: new_cache()})
        elapsed = time.perf_counter() - t0
        _use_kernel(model, kernel)
        return elapsed

    with torch.inference_mode():
        with slotted.route(slots):
            model(input_ids=ids, use_cache=True, **{cache_arg: cache})
        for _ in range(3):  # warm-up
            for kind in kinds:
                step(kind)
        for i in range(args.steps):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for kind in order:
                times[kind].append(step(kind))
            times["products alone"].append(products(calls))
            times["products alone, float16 weights"].append(products(half_calls))
            times["products alone, bmm"].append(products_bmm())
            times["streaming floor"].append(streaming())
        # prefills of rows on distinct adapters, as the engine runs them (a fresh cache, the last logits)
        for rows in PREFILL_ROWS:
            prompt = torch.randint(5, vocab - 1, (rows, PREFILL_TOKENS), generator=gen)
            for i in range(max(args.steps // 3, 1) + 2):
                for kind in PREFILL_KINDS[i % 4:] + PREFILL_KINDS[:i % 4]:
                    elapsed = prefill(kind, prompt)
                    if i >= 2:  # the first two rounds bind the calls and warm up
                        times[f"prefill {rows}, {kind}"].append(elapsed)
        # an adapter of 4x the rank in a slot no row uses: every layer's buffers grow to r=64
        # then the first row on it: the other rows at their own rank, or (as before) all at 64
        slotted.load(SLOTS, slotted.prepare(*wide))
        slotted.sync_rows(slots)
        synced = slots
        phase = {"base, r=64 in the bank": "base", MIXED: "adapters", WIDE_ROW: WIDE_ROW, WIDE_ROW_BMM: WIDE_ROW_BMM,
                 WIDE_ROW_BMM_PADDED: WIDE_ROW_BMM_PADDED}
        if kernel:
            phase[WIDE_ROW_PADDED] = WIDE_ROW_PADDED
        labels = list(phase)
        for label in labels:  # warm-up (binds the calls)
            step(phase[label])
        for i in range(args.steps):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                times[label].append(step(phase[label]))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    return {
        "machine": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cpu_kernel": str(kernel.path) if kernel else None},
        "setup": {"spec": spec.__dict__, "rows": CLIENTS, "prompt_tokens": PROMPT_TOKENS, "steps": args.steps,
                  "cache_columns": [PROMPT_TOKENS, length], "adapter_bytes_per_step": adapter_bytes},
        "step_ms": ms,
        "step_ms_all": {k: [round(x * 1e3, 3) for x in v] for k, v in times.items()},
        "ratio_base_over_adapters": ms["base"] / ms["adapters"],
        "ratio_base_over_adapters_bmm": ms["base"] / ms["adapters, bmm"],
        "ratio_base_over_adapters_float16": ms["base"] / ms[HALF] if HALF in ms else None,
        "adapter_budget_ms": ms["base"] / TARGET - ms["base"],
        "pass": {},  # a diagnostic: no target of its own
    }


def report(r: dict[str, Any]) -> str:
    ms, s, m = r["step_ms"], r["setup"], r["machine"]
    base = ms["base"]
    lines = [
        f"decode step with {s['rows']} rows ({m['date']}, torch {m['torch']}, {m['torch_threads']} threads): "
        f"{s['steps']} of each, medians; cache {s['cache_columns'][0]}-{s['cache_columns'][1]} "
        f"columns; one step reads {s['adapter_bytes_per_step'] / 1e6:.1f} MB of adapter weights",
        "",
        "| what                                               | ms     | over the base step |",
        "|----------------------------------------------------|--------|--------------------|",
    ]
    for kind, label in (("base", "step, every row on the base model"),
                        ("adapters", "step, 32 rows on 32 adapters (the server's path)"),
                        ("adapters, bmm", "same, with torch's bmm instead of the kernel"),
                        ("base + reading", "step, base + reading those weights in place"),
                        ("adapters, products skipped", "the server's path with its products skipped"),
                        (SHARED, "32 rows on 8 adapters (4 rows each), the kernel"),
                        (HALF, "32 rows on 32 adapters, float16 weights, kernel"),
                        (MIXED, "same, after an r=64 adapter lands in slot 64"),
                        (WIDE_ROW, "same, the first row on that r=64 adapter"),
                        (WIDE_ROW_PADDED, "same, every row multiplying 64 rank columns"),
                        (WIDE_ROW_BMM, "same one r=64 row, torch's bmm in rank bands"),
                        (WIDE_ROW_BMM_PADDED, "same with bmm, every row multiplying 64 columns"),
                        ("products alone", "the 28 layers' adapter products alone, the kernel"),
                        ("products alone, bmm", "the same with torch's bmm"),
                        ("products alone, float16 weights", "the same, the kernel on float16 weights"),
                        ("streaming floor", "reading the same bytes as one flat tensor")):
        reference = ms["base, r=64 in the bank"] if kind in WIDE_KINDS else base
        if kind not in ms:  # no kernel here: nothing to compare with
            continue
        over = f"{ms[kind] - reference:+.2f} ms" if kind in (*KINDS, HALF, *WIDE_KINDS) else ""
        lines.append(f"| {label:<50} | {ms[kind]:6.2f} | {over:<18} |")
    lines += [
        "",
        f"prefill of {PREFILL_TOKENS} tokens per row, each row on its own adapter (the last logits only); "
        "LoRA products = the prefill minus the same prefill with its products skipped:",
        "",
        "| rows | base, ms | adapters, the kernel | adapters, torch (gather + bmm) | products: kernel | products: torch |",
        "|------|----------|----------------------|--------------------------------|------------------|-----------------|",
    ]
    for n in PREFILL_ROWS:
        p = {kind: ms[f"prefill {n}, {kind}"] for kind in PREFILL_KINDS}
        lines.append(f"| {n:>4} | {p['base']:8.2f} | {p['kernel']:20.2f} | {p['torch']:30.2f} | "
                     f"{p['kernel'] - p['products skipped']:16.2f} | {p['torch'] - p['products skipped']:15.2f} |")
    kernel = m.get("cpu_kernel")
    lines += [
        "",
        f"CPU kernel: {kernel or 'not available (see the warning above): both adapter steps ran bmm'}",
        "",
        f"base / adapters = {r['ratio_base_over_adapters']:.3f} (with bmm {r['ratio_base_over_adapters_bmm']:.3f}): the ceiling of bench_serving's target 2 here, "
        f"before HTTP adds the same cost to both sides. At this level the target allows "
        f"{r['adapter_budget_ms']:.2f} ms of adapter work per step; the step spends "
        f"{ms['adapters'] - base:.2f} ms ({ms['adapters, products skipped'] - base:+.2f} ms of it outside the "
        f"products), and reading the weights alone, with nothing around it, takes "
        f"{ms['streaming floor']:.2f} ms: even at that floor the step ratio would be "
        f"{base / (base + ms['streaming floor']):.3f}.",
    ]
    if r.get("ratio_base_over_adapters_float16"):
        lines.append(f"With float16 adapter weights (ADAPTERFORGE_ADAPTER_DTYPE=float16: half the bytes, the same "
                     f"float32 products) base / adapters = {r['ratio_base_over_adapters_float16']:.3f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind (default 60)")
    add_common_arguments(parser)
    return run_bench(parser.parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
