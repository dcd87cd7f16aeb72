"""Serving slots against HF PEFT on one device (a lent GPU): the check the CPU test suite cannot make there.

The test suite proves ``SlottedModel`` computes PEFT's LoRA on CPUs; on a GPU the slots take other
paths (no compiled CPU kernel, no row buffers by default, ``embedding_bag`` gathers for mixed decode
steps, bfloat16 checkpoints). This script builds a tiny llama and four PEFT adapters of different ranks
(q/v only, all-linear, rsLoRA, a rank pattern), then on ``--device``:

- float32: a mixed batch (four adapters and base rows, one adapter twice) through prefill and one
  decode step on a cache must give PEFT's mixed-batch ``adapter_names`` logits within ``1e-4``, with
  the slot bank through torch, with row buffers, and through the fused Triton kernel (decode steps;
  on CUDA devices it must be there and must have run; on a CPU only with ``TRITON_INTERPRET=1``).
  The fused path is warmed up first, as the server does; on a GPU the steps after it must compile no
  variant the warm-up did not (counted in Triton's JIT caches);
- bfloat16: the same batch must stay as close to PEFT's float32 answer as PEFT's own bfloat16 model
  (mean error at most 1.5x PEFT's, largest at most 2.5x);

and in both, every adapter row must differ from the base row (nothing silently served the base). It
prints one line per check and exits 1 if any fails. No timing; ~20 s on a CPU (without the fused kernel).

    python bench/check_device_serving.py [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from adapters_core.peft_format import read_adapter  # noqa: E402
from adapters_core.serving import SlottedModel  # noqa: E402
from adapters_core.serving.gpu_bgmv import KernelUnavailable, load_gpu_bgmv_or_raise  # noqa: E402
from adapters_core.tiny_models import TinyLlamaSpec, build_tiny_llama  # noqa: E402

logger = logging.getLogger("check_device_serving")

SPEC = TinyLlamaSpec(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                     intermediate_size=512, max_position_embeddings=256)
ADAPTERS: dict[str, dict[str, Any]] = {
    "r8-qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "r16-all": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "r32-rslora": {"r": 32, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
    "r4-pattern": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "rank_pattern": {"down_proj": 24},
                   "alpha_pattern": {"down_proj": 12}},
}
ROWS = [1, 2, 0, 3, 4, 2]  # slot per row: 0 = base; slot 2 twice
F32_ATOL = 1e-4
MIN_EFFECT = 1e-3  # an adapter row differs from the base row by more than this


def make_adapters(model_dir: Path, out: Path) -> dict[str, Path]:
    """The four adapters, saved by PEFT with random (seeded) non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                            LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        pm.save_pretrained(str(out / name))
        folders[name] = out / name
    return folders


def peft_model(model_dir: Path, folders: dict[str, Path], dtype: torch.dtype, device: str) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(folders)
    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    pm = PeftModel.from_pretrained(base.to(device), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(folders[name], adapter_name=name)
    return pm.eval()


# how the mixed decode step runs its LoRA products: (row buffers, the fused kernel)
PATHS = {"bank": (0, False), "row-buffers": (8, False), "fused": (0, True)}


def slotted(model_dir: Path, folders: dict[str, Path], dtype: torch.dtype, device: str,
            row_capacity: int, fused: bool) -> SlottedModel:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    sm = SlottedModel(model, len(folders), row_capacity=row_capacity, cpu_kernels=not fused, gpu_kernels=fused)
    for slot, folder in enumerate(folders.values(), start=1):
        config, tensors = read_adapter(folder)
        sm.load(slot, sm.prepare(config, tensors))
    return sm


Call = Callable[[torch.Tensor, Any], Any]


def compiled_variants(sm: SlottedModel) -> int | None:
    """How many variants Triton has compiled for the fused kernels in this process, from its JIT caches (None
    in its interpreter, without the kernel, or where a Triton version keeps them otherwise)."""
    kernel = sm.gpu_kernel
    if kernel is None:
        return None
    shrink, expand = kernel._prefill_kernel
    total = 0
    for jitted in (kernel._kernel, shrink, expand):
        caches = getattr(jitted, "device_caches", None)
        if not isinstance(caches, dict):
            return None
        try:
            total += sum(len(entry[0]) for entry in caches.values())
        except (TypeError, IndexError, KeyError):
            return None
    return total


def two_steps(call: Call, ids: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefill logit, and the logits of one decode step on the cache (fed ``token`` per row)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        first = call(ids, cache).logits.float()
        step = call(token, cache).logits[:, -1].float()
    return first, step


def run(device: str) -> list[tuple[str, bool, str]]:
    from transformers import AutoTokenizer

    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        results.append((name, ok, detail))
        logger.info("%s %s: %s", "PASS" if ok else "FAIL", name, detail)

    with tempfile.TemporaryDirectory(prefix="check_device_serving_") as tmp:
        work = Path(tmp)
        build_tiny_llama(work / "model", SPEC, seed=0)
        folders = make_adapters(work / "model", work / "adapters")
        tokenizer = AutoTokenizer.from_pretrained(work / "model")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, tokenizer.vocab_size, (len(ROWS), 12), generator=gen).to(device)
        token = torch.randint(3, tokenizer.vocab_size, (len(ROWS), 1), generator=gen).to(device)
        names = ["__base__" if s == 0 else list(folders)[s - 1] for s in ROWS]

        def peft_call(pm: Any) -> Call:
            return lambda x, cache: pm(input_ids=x, past_key_values=cache, use_cache=True, adapter_names=names)

        def ours_call(sm: SlottedModel) -> Call:
            def call(x: torch.Tensor, cache: Any) -> Any:
                if x.shape[1] == 1:
                    sm.sync_rows(ROWS)
                with sm.route(ROWS):
                    return sm.model(input_ids=x, past_key_values=cache, use_cache=True)
            return call

        truth = two_steps(peft_call(peft_model(work / "model", folders, torch.float32, device)), ids, token)
        peft_bf16 = two_steps(peft_call(peft_model(work / "model", folders, torch.bfloat16, device)), ids, token)
        for tag, (row_capacity, fused) in PATHS.items():
            if fused:
                try:
                    interpreted = load_gpu_bgmv_or_raise().interpret
                except KernelUnavailable as exc:
                    check(f"{tag} kernel available", device == "cpu", str(exc))  # required on CUDA devices
                    continue
                if interpreted != (device == "cpu"):
                    logger.info("SKIP %s: Triton runs kernels on %s here (a CPU needs TRITON_INTERPRET=1)", tag,
                                "CPU tensors" if interpreted else "GPUs")
                    continue
            for dtype in (torch.float32, torch.bfloat16):
                sm = slotted(work / "model", folders, dtype, device, row_capacity, fused)
                if fused:  # as the server does before it takes requests
                    sm.warm_up_gpu_kernel()
                compiled = compiled_variants(sm)
                before = sm.gpu_kernel.launches if sm.gpu_kernel else 0
                got = two_steps(ours_call(sm), ids, token)
                if fused:
                    launches = (sm.gpu_kernel.launches if sm.gpu_kernel else 0) - before
                    check(f"{str(dtype).removeprefix('torch.')} {tag} ran", launches > 0,
                          f"{launches} launches of the fused kernels in the prefill and the decode step")
                    after = compiled_variants(sm)
                    if compiled is not None and after is not None:  # (Triton's interpreter compiles nothing)
                        check(f"{str(dtype).removeprefix('torch.')} {tag} warm-up covered", after == compiled,
                              f"{compiled} variants compiled by the warm-up, {after - compiled} more by the steps")
                kind = str(dtype).removeprefix("torch.")
                for position, label in enumerate(("prefill", "decode")):
                    ours, ref = got[position], truth[position]
                    name = f"{kind} {tag} {label}"
                    if dtype == torch.float32:
                        err = (ours - ref).abs().max().item()
                        check(name, err <= F32_ATOL, f"max |ours - peft| {err:.2e} (bound {F32_ATOL:.0e})")
                    else:
                        theirs = peft_bf16[position]
                        ours_mean, peft_mean = (ours - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
                        ours_max, peft_max = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
                        check(name, ours_mean <= 1.5 * peft_mean and ours_max <= 2.5 * peft_max,
                              f"error vs peft float32: mean {ours_mean:.2e} (peft bf16 {peft_mean:.2e}), "
                              f"max {ours_max:.2e} (peft bf16 {peft_max:.2e})")
                    base_rows = [i for i, s in enumerate(ROWS) if s == 0]
                    effects = [(ours[i] - ours[base_rows[0]]).abs().max().item() for i, s in enumerate(ROWS) if s]
                    check(f"{name} adapters apply", min(effects) > MIN_EFFECT,
                          f"smallest adapter-row vs base-row difference {min(effects):.2e}")
                del sm
    return results


def main() -> int:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        logger.info("device: %s, torch %s", torch.cuda.get_device_name(0), torch.__version__)
    results = run(args.device)
    failed = [name for name, ok, _ in results if not ok]
    logger.info("%d checks, %d failed%s", len(results), len(failed), f": {failed}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
