"""Benchmark AdapterForge's inference server against HF ``peft`` generate, side by side in one run.

One run builds a seeded Llama-style model locally (CPU spec: hidden 256, 4 layers, 8 heads / 4 kv
heads, intermediate 688, float32), writes LoRA adapters in PEFT format (r=16, ``all-linear``; one
template saved by ``peft``, the others the same keys with seeded random weights), starts the real
server (``uvicorn app.main:create_app`` in a subprocess, SQLite, adapters uploaded through
``POST /adapters``) and drives it with concurrent HTTP clients (``httpx``, one asyncio task per
client, each sending its requests one after the other). Every request: a distinct prompt of 20-40
tokens, 64 new tokens (``min_new_tokens`` = ``max_new_tokens``, greedy), so every contender
generates exactly the same number of tokens.

1. 32 clients, each with its own adapter: aggregate generated tokens/s of the server vs the same
   32 requests through ``peft``'s ``generate`` one at a time (``set_adapter`` per request)
   (target >= 10x) and vs ``peft``'s ``generate`` on one mixed batch with ``adapter_names``
   (target >= 4x);
2. the same load with every request on the base model vs on 32 adapters (target: adapters >= 0.85
   of base);
3. p50 / p99 time to first token of the 32-adapter load, measured by streaming clients;
4. cold adapter load (safetensors on disk → checked, laid out, copied into a device slot) vs
   ``peft``'s ``load_adapter`` (target >= 5x faster);
5. throughput when each request picks one of 8, 64 or 512 registered adapters at random (64 slots:
   the 512 mix evicts and reloads slots from host memory all the time) (target: the 512 figure
   within 15% of the 8 figure).

Each load runs ``--rounds`` times, contenders interleaved in rotated order, the loads a ratio
compares back to back (in turn first and second); tokens/s figures are medians, and each ratio is
the median of its per-round ratios (a machine that slows down for a while moves both of its loads),
as in ``bench_training.py``.
The server's greedy tokens are compared with ``peft``'s for every 32-adapter request (equal in
float32 but for a rare tie: the report says where a request parts and by how much ``peft``'s own
logits preferred its token there; in bfloat16 the two round differently, and tokens can part where
logits nearly tie).
``--device cuda`` runs the GPU variant (a larger bfloat16 model, ``--spec gpu``).
``--adapter-dtype`` sets the server's ``ADAPTERFORGE_ADAPTER_DTYPE`` (default ``auto``; ``float16``
on a float32 model: half the adapter bytes per decode step, the weights rounded to float16, which
the greedy comparison with ``peft`` then measures).

    python bench/bench_serving.py [--quick] [--rounds N] [--device cpu|cuda] [--adapter-dtype auto|float32|float16]
                                  [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from _runner import add_common_arguments, run_bench

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from adapters_core.tiny_models import TinyLlamaSpec, build_tiny_llama  # noqa: E402

logger = logging.getLogger("bench_serving")

RANK, ALPHA = 16, 32
CLIENTS = 32
NEW_TOKENS = 64
MIXES = (8, 64, 512)
SLOTS = 64
COLD_LOADS = 30  # target 4's sample, --quick too (a few seconds: 8 loads ranged 2.3x-9.3x on the GPU)
WARM_UP_LOADS = 2
SPECS = {
    "cpu": TinyLlamaSpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=688, max_position_embeddings=512),
    "gpu": TinyLlamaSpec(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                         intermediate_size=2816, max_position_embeddings=1024),
}
TARGETS = {
    "vs_peft_sequential": 10.0,  # ours tok/s / peft one-at-a-time tok/s >= this
    "vs_peft_mixed_batch": 4.0,  # ours tok/s / peft mixed-batch generate tok/s >= this
    "adapters_vs_base": 0.85,  # ours 32 adapters tok/s / ours base tok/s >= this
    "cold_load_speedup": 5.0,  # peft load_adapter time / ours cold slot load >= this
    "mix_512_vs_8": 0.85,  # tok/s with 512 adapters / tok/s with 8 >= this
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "adapters", "train", "on", "a", "frozen", "base", "model", "and", "low", "rank", "updates", "add", "two", "thin", "matrices", "to", "each", "weight", "so", "that", "many", "tasks", "share", "one", "model"]


# ------------------------------------------------------------------------------------------ set-up
def make_prompts(tokenizer: Any, n: int) -> list[str]:
    """``n`` distinct prompts of 20-40 tokens (seeded)."""
    rng = random.Random(0)
    prompts = []
    while len(prompts) < n:
        words = rng.choices(WORDS, k=rng.randint(12, 30))
        text = " ".join(words)
        if 20 <= len(tokenizer(text)["input_ids"]) <= 40 and text not in prompts:
            prompts.append(text)
    return prompts


def make_adapters(model_dir: Path, out: Path, n: int, dtype: torch.dtype) -> list[Path]:
    """``n`` PEFT adapters: one saved by ``peft`` itself, the rest the same files with seeded random weights."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    template = out / "a0"
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), cfg)
    peft_model.save_pretrained(template)
    keys = load_file(template / "adapter_model.safetensors")
    folders = [template]
    gen = torch.Generator().manual_seed(1)
    for i in range(1, n):
        folder = out / f"a{i}"
        folder.mkdir(parents=True)
        tensors = {}
        for key, t in keys.items():
            std = 0.02 if "lora_B" in key else 1.0 / t.shape[1] ** 0.5
            tensors[key] = (torch.randn(t.shape, generator=gen) * std).to(t.dtype)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        folders.append(folder)
    return folders


class Server:
    """The real API server in a subprocess (uvicorn), on SQLite in a temporary data dir."""

    def __init__(self, work: Path, model_dir: Path, device: str, adapter_dtype: str) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "ADAPTERFORGE_DATA_DIR": str(work / "data"),
            "ADAPTERFORGE_BASE_MODEL": str(model_dir),
            "ADAPTERFORGE_DEVICE": device,
            "ADAPTERFORGE_ADAPTER_DTYPE": adapter_dtype,
            "ADAPTERFORGE_RECONCILE_INTERVAL_SECONDS": "0",
            "ADAPTERFORGE_ADAPTER_SLOTS": str(SLOTS),
            "ADAPTERFORGE_MAX_BATCH_SIZE": "64",
            "ADAPTERFORGE_MAX_BATCH_TOKENS": "16384",
            "ADAPTERFORGE_MAX_QUEUE_DEPTH": "1024",
            "ADAPTERFORGE_LOG_LEVEL": "WARNING",
        }
        subprocess.run([sys.executable, "-m", "adapterforge.cli", "db", "upgrade"], env=self.env, check=True,
                       capture_output=True)
        self.log = (work / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the server did not start; see {work / 'server.log'}")

    def lora_kernel(self) -> str:
        """What computed the server's LoRA products (``/readyz``): cpu, triton or torch (with the error when a
        GPU kernel stopped being used)."""
        serving = httpx.get(f"{self.base}/readyz", timeout=10).json()["checks"]["serving"]
        error = serving.get("lora_kernel_error")
        return str(serving.get("lora_kernel")) + (f" (the GPU kernel failed: {error})" if error else "")

    def upload(self, name: str, folder: Path) -> None:
        files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
        r = httpx.post(f"{self.base}/adapters", files=[("name", (None, name)), *files], timeout=60)
        r.raise_for_status()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------- loads
async def _client_run(base: str, plan: list[list[tuple[str | None, str]]], *, stream: bool) -> dict[str, Any]:
    """Every client sends its (adapter, prompt) requests one after the other; all clients at once."""
    body = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "temperature": 0}
    ttfts: list[float] = []
    tokens: dict[tuple[int, int], list[int]] = {}
    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=len(plan) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one(c: int, requests: list[tuple[str | None, str]]) -> None:
            for k, (adapter, prompt) in enumerate(requests):
                params = {"adapter": adapter} if adapter else {}
                sent = time.perf_counter()
                if not stream:
                    r = await client.post("/generate", params=params, json={**body, "prompt": prompt})
                    r.raise_for_status()
                    tokens[(c, k)] = r.json()["tokens"]
                    continue
                async with client.stream("POST", "/generate", params=params,
                                         json={**body, "prompt": prompt, "stream": True}) as r:
                    r.raise_for_status()
                    first = True
                    async for line in r.aiter_lines():
                        if first and line.startswith("event: token"):
                            ttfts.append(time.perf_counter() - sent)
                            first = False
                        elif line.startswith("data: ") and '"finish_reason"' in line:
                            tokens[(c, k)] = json.loads(line[6:])["tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, reqs) for c, reqs in enumerate(plan)))
        elapsed = time.perf_counter() - t0
    generated = sum(len(t) for t in tokens.values())
    return {"seconds": elapsed, "tokens": generated, "tok_s": generated / elapsed, "ttft": ttfts,
            "outputs": tokens}


def server_load(server: Server, plan: list[list[tuple[str | None, str]]], *, stream: bool = False) -> dict[str, Any]:
    return asyncio.run(_client_run(server.base, plan, stream=stream))


def peft_sequential(model: Any, tokenizer: Any, requests: list[tuple[str, str]], device: str) -> dict[str, Any]:
    outputs = []
    t0 = time.perf_counter()
    for adapter, prompt in requests:
        model.set_adapter(adapter)
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        outputs.append(out[0, ids["input_ids"].shape[1]:].tolist())
    elapsed = time.perf_counter() - t0
    generated = sum(len(o) for o in outputs)
    return {"seconds": elapsed, "tokens": generated, "tok_s": generated / elapsed, "outputs": outputs}


def where_greedy_parts(model: Any, tokenizer: Any, request: tuple[str, str], ours: list[int], theirs: list[int],
                       device: str) -> dict[str, Any]:
    """Where the server's greedy tokens first differ from ``peft``'s for one request, and by how much
    ``peft``'s own logits preferred its token there (a near tie: rounding, not a wrong adapter)."""
    position = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                    min(len(ours), len(theirs)))
    if position >= min(len(ours), len(theirs)):
        return {"position": position, "peft_logit_margin": None}  # one is a prefix of the other
    adapter, prompt = request
    model.set_adapter(adapter)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([theirs[:position]], dtype=ids.dtype)], dim=1).to(device)
    with torch.inference_mode():
        logits = model(input_ids=full).logits[0, -1].float()
    return {"position": position, "peft_logit_margin": float(logits[theirs[position]] - logits[ours[position]])}


def peft_mixed_batch(model: Any, tokenizer: Any, requests: list[tuple[str, str]], device: str) -> dict[str, Any]:
    tokenizer.padding_side = "left"
    batch = tokenizer([p for _, p in requests], return_tensors="pt", padding=True).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, adapter_names=[a for a, _ in requests], max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
    elapsed = time.perf_counter() - t0
    generated = out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])
    return {"seconds": elapsed, "tokens": generated, "tok_s": generated / elapsed}


def cold_loads(model_dir: Path, folders: list[Path], n: int, device: str, dtype: torch.dtype,
               weight_dtype: torch.dtype | None, slot_dtype: torch.dtype | None = None) -> dict[str, list[float]]:
    """Per load, interleaved: ours = read + check + lay out + copy into a slot; peft = load_adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters_core.peft_format import read_adapter
    from adapters_core.serving import SlottedModel

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    slotted = SlottedModel(base(), SLOTS, max_rank=64, dtype=slot_dtype, weight_dtype=weight_dtype)
    peft_model = PeftModel.from_pretrained(base(), folders[0], adapter_name="first").eval()
    times: dict[str, list[float]] = {"ours": [], "peft": [], "ours_copy_only": []}
    for i in range(-WARM_UP_LOADS, n):  # the first loads of a process (allocator, CUDA kernels) are not timed
        folder = folders[1 + i % (len(folders) - 1)]
        t0 = time.perf_counter()
        prepared = slotted.prepare(*read_adapter(folder))
        t1 = time.perf_counter()
        slotted.load(1 + i % SLOTS, prepared)
        _sync(device)
        t2 = time.perf_counter()
        peft_model.load_adapter(folder, adapter_name=f"x{i + WARM_UP_LOADS}")
        _sync(device)
        t3 = time.perf_counter()
        peft_model.delete_adapter(f"x{i + WARM_UP_LOADS}")
        if i < 0:
            continue
        times["ours"].append(t2 - t0)
        times["ours_copy_only"].append(t2 - t1)
        times["peft"].append(t3 - t2)
    return times


def in_fresh_process(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a new Python process: this one has run ``peft`` on its main thread, and a second
    thread's parallel torch work would then run at half speed (see ``app.serving.engine``)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def engine_static_batch(work: Path, model_dir: Path, folders: list[Path], prompts: list[str], device: str,
                        rounds: int, adapter_dtype: str) -> dict[str, float]:
    """Context, not a target: the generation engine alone (no HTTP, no event loop), the 32 requests
    submitted at once, adapters already in host memory; median tokens/s over ``rounds``."""
    from adapters_core.peft_format import read_adapter
    from app.serving.host import ServingHost
    from app.serving.sampling import SamplingParams
    from app.settings import Settings

    host = ServingHost.load(Settings(data_dir=work / "engine-alone", base_model=str(model_dir), device=device,
                                     adapter_slots=SLOTS, max_batch_tokens=16384,
                                     adapter_dtype=adapter_dtype))  # type: ignore[arg-type]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0)
    ids = [host.encode_prompt(p) for p in prompts]
    out: dict[str, list[float]] = {"adapters": [], "base": []}
    try:
        for _ in range(rounds + 1):  # the first round warms the slots up
            for kind in out:
                leases = [host.bank.fetch(f"v{c}", f"a{c}@1", lambda c=c: host.slotted.prepare(
                    *read_adapter(folders[c]))) if kind == "adapters" else None for c in range(len(ids))]
                t0 = time.perf_counter()
                handles = [host.engine.submit(p, params, lease=lease) for p, lease in zip(ids, leases, strict=True)]
                tokens = sum(len(h.wait(600).token_ids) for h in handles)
                out[kind].append(tokens / (time.perf_counter() - t0))
    finally:
        host.close()
    return {k: statistics.median(v[1:]) for k, v in out.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    per_client = 1 if quick else 4
    device = args.device
    spec = SPECS[args.spec or ("gpu" if device.startswith("cuda") else "cpu")]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.adapter_dtype == "float16" and dtype != torch.float32:
        raise SystemExit("--adapter-dtype float16 halves the slots of a float32 model; the cuda bench model is "
                         "bfloat16 (its slots are 16-bit already with auto): use auto or float32")
    n_adapters = max(MIXES)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serving_")
    work = Path(tmp.name)
    model_dir = work / "model"

    t0 = time.perf_counter()
    build_tiny_llama(model_dir, spec, seed=0)
    if dtype != torch.float32:  # the server loads the checkpoint's own dtype on GPUs
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folders = make_adapters(model_dir, work / "adapters", n_adapters, dtype)
    logger.info("built the model and %d adapters in %.1f s", n_adapters, time.perf_counter() - t0)

    server = Server(work, model_dir, device, args.adapter_dtype)
    try:
        t0 = time.perf_counter()
        for i, folder in enumerate(folders):
            server.upload(f"a{i}", folder)
        logger.info("uploaded %d adapters in %.1f s", n_adapters, time.perf_counter() - t0)
        prompts = make_prompts(tokenizer, CLIENTS * per_client)
        own = [[(f"a{c}", prompts[c * per_client + k]) for k in range(per_client)] for c in range(CLIENTS)]
        base_plan = [[(None, p) for _, p in reqs] for reqs in own]
        rng = random.Random(0)
        mix_plans = {n: [[(f"a{rng.randrange(n)}", p) for _, p in reqs] for reqs in own] for n in MIXES}
        peft_requests = [reqs[0] for reqs in own]  # one request per client: 32 requests, 32 adapters

        logger.info("loading %d adapters into peft", CLIENTS)
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), folders[0], adapter_name="a0"
        ).eval()
        for c in range(1, CLIENTS):
            peft_model.load_adapter(folders[c], adapter_name=f"a{c}")

        # warm-up: every adapter through the server once (host tier warm), and each contender once
        warm = [[(f"a{i}", prompts[0])] for i in range(n_adapters)]
        for chunk in range(0, len(warm), CLIENTS):
            server_load(server, warm[chunk:chunk + CLIENTS])
        server_load(server, base_plan)
        peft_sequential(peft_model, tokenizer, peft_requests[:2], device)

        results: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                                    ("ours_adapters", "ours_base", "peft_sequential", "peft_mixed",
                                                     "ttft", *(f"mix_{n}" for n in MIXES))}
        contenders = {
            "ours_adapters": lambda: server_load(server, own),
            "ours_base": lambda: server_load(server, base_plan),
            "peft_sequential": lambda: peft_sequential(peft_model, tokenizer, peft_requests, device),
            "peft_mixed": lambda: peft_mixed_batch(peft_model, tokenizer, peft_requests, device),
            "ttft": lambda: server_load(server, own, stream=True),
            **{f"mix_{n}": (lambda n=n: server_load(server, mix_plans[n])) for n in MIXES},
        }
        # the loads a ratio compares run back to back, in turn first and second, so that the machine's
        # drift (minutes long here) moves both alike; the groups rotate from round to round
        groups = [("ours_adapters", "ours_base"), ("peft_sequential",), ("peft_mixed",), ("ttft",),
                  tuple(f"mix_{n}" for n in MIXES)]
        assert sorted(k for g in groups for k in g) == sorted(contenders)
        for r in range(rounds):
            shift = r % len(groups)
            for group in groups[shift:] + groups[:shift]:
                for key in (group if r % 2 == 0 else group[::-1]):
                    results[key].append(contenders[key]())
                    logger.info("round %d %s: %.0f tok/s", r + 1, key, results[key][-1]["tok_s"])
        lora_kernel = server.lora_kernel()
    finally:
        server.close()

    same = 0
    seq_outputs = results["peft_sequential"][0]["outputs"]
    served = results["ours_adapters"][0]["outputs"]
    parted = []
    for c in range(CLIENTS):
        same += int(served[(c, 0)] == seq_outputs[c])
        if served[(c, 0)] != seq_outputs[c]:
            parted.append(where_greedy_parts(peft_model, tokenizer, peft_requests[c], served[(c, 0)], seq_outputs[c],
                                             device) | {"client": c})
    weight_dtype = torch.float16 if args.adapter_dtype == "float16" else None
    slot_dtype = torch.float32 if args.adapter_dtype == "float32" else None  # (as the server's slots are)
    loads = cold_loads(model_dir, folders[:33], COLD_LOADS, device, dtype, weight_dtype, slot_dtype)
    engine_alone = in_fresh_process(engine_static_batch, work, model_dir, folders, prompts[:CLIENTS], device, rounds,
                                    args.adapter_dtype)

    def med(key: str) -> float:
        return statistics.median(x["tok_s"] for x in results[key])

    ttft = sorted(t for run_ in results["ttft"] for t in run_["ttft"])
    out: dict[str, Any] = {
        "machine": machine_info(device),
        "setup": {"spec": spec.__dict__, "dtype": str(dtype), "adapter_dtype": args.adapter_dtype,
                  "device": device, "clients": CLIENTS,
                  "requests_per_client": per_client, "new_tokens": NEW_TOKENS, "rank": RANK, "slots": SLOTS,
                  "rounds": rounds, "quick": quick,
                  "params": n_params, "server_lora_kernel": lora_kernel},
        "tok_s": {k: med(k) for k in results if k != "ttft"},
        "tok_s_all": {k: [round(x["tok_s"], 1) for x in v] for k, v in results.items()},
        "ttft_ms": {"p50": _pct(ttft, 50) * 1e3, "p99": _pct(ttft, 99) * 1e3, "n": len(ttft)},
        "cold_load_ms": {k: statistics.median(v) * 1e3 for k, v in loads.items()},
        "greedy_outputs_equal_peft": f"{same}/{CLIENTS}",
        "greedy_parted": parted,
        "engine_alone_tok_s": engine_alone,
    }
    pairs = {"vs_peft_sequential": ("ours_adapters", "peft_sequential"),
             "vs_peft_mixed_batch": ("ours_adapters", "peft_mixed"),
             "adapters_vs_base": ("ours_adapters", "ours_base"), "mix_512_vs_8": ("mix_512", "mix_8")}
    per_round = {k: [x["tok_s"] / y["tok_s"] for x, y in zip(results[a], results[b], strict=True)]
                 for k, (a, b) in pairs.items()}
    per_round["cold_load_speedup"] = [p / o for o, p in zip(loads["ours"], loads["peft"], strict=True)]
    out["ratios"] = {k: statistics.median(v) for k, v in per_round.items()}
    out["ratio_range"] = {k: (min(v), max(v)) for k, v in per_round.items()}
    out["pass"] = {k: out["ratios"][k] >= TARGETS[k] for k in TARGETS}
    out["targets"] = TARGETS
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def machine_info(device: str) -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(r: dict[str, Any]) -> str:
    t, ratios, ok = r["tok_s"], r["ratios"], {k: "PASS" if v else "FAIL" for k, v in r["pass"].items()}
    s, m = r["setup"], r["machine"]
    rows = [
        ("metric", "ours", "HF peft / reference", "ratio", "target", "result"),
        ("1a. 32 clients x own adapter vs peft one at a time", f"{t['ours_adapters']:.0f} tok/s",
         f"{t['peft_sequential']:.0f} tok/s", f"{ratios['vs_peft_sequential']:.1f}x", ">= 10x",
         ok["vs_peft_sequential"]),
        ("1b. same vs peft generate on one mixed batch", f"{t['ours_adapters']:.0f} tok/s",
         f"{t['peft_mixed']:.0f} tok/s", f"{ratios['vs_peft_mixed_batch']:.1f}x", ">= 4x",
         ok["vs_peft_mixed_batch"]),
        ("2. 32 adapters vs the same load on the base", f"{t['ours_adapters']:.0f} tok/s",
         f"{t['ours_base']:.0f} tok/s (ours, base)", f"{ratios['adapters_vs_base']:.2f}", ">= 0.85",
         ok["adapters_vs_base"]),
        ("3. time to first token, 32 streaming clients", f"p50 {r['ttft_ms']['p50']:.0f} ms",
         f"p99 {r['ttft_ms']['p99']:.0f} ms", "", "(report)", ""),
        ("4. cold adapter load into a slot vs load_adapter", f"{r['cold_load_ms']['ours']:.2f} ms",
         f"{r['cold_load_ms']['peft']:.2f} ms", f"{ratios['cold_load_speedup']:.1f}x", ">= 5x",
         ok["cold_load_speedup"]),
        ("5. 512 vs 8 adapters in the request mix", f"{t['mix_512']:.0f} tok/s",
         f"{t['mix_8']:.0f} tok/s (8); {t['mix_64']:.0f} (64)", f"{ratios['mix_512_vs_8']:.2f}", ">= 0.85",
         ok["mix_512_vs_8"]),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def fmt(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    spec = s["spec"]
    return "\n".join([
        f"serving benchmark ({m['date']}): torch {m['torch']}, {m['torch_threads']} threads, {m['cpu_count']} CPUs"
        f"{', ' + m['gpu'] if 'gpu' in m else ''}, transformers {m['transformers']}, peft {m['peft']}",
        f"model: Llama hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers, "
        f"{spec['num_attention_heads']}/{spec['num_key_value_heads']} heads, intermediate {spec['intermediate_size']}, "
        f"{s['params'] / 1e6:.2f}M params, {s['dtype']} on {s['device']}; LoRA r={s['rank']} all-linear, "
        f"ADAPTERFORGE_ADAPTER_DTYPE={s.get('adapter_dtype', 'auto')}; "
        f"{s['clients']} clients x {s['requests_per_client']} requests x {s['new_tokens']} new tokens; "
        f"{s['slots']} slots; {s['rounds']} rounds" + (" (--quick)" if s["quick"] else ""),
        "",
        fmt(rows[0]),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(fmt(row) for row in rows[1:]),
        "",
        "tok/s per round: " + "; ".join(f"{k} {v}" for k, v in r["tok_s_all"].items() if k != "ttft"),
        "ratios are medians of per-round ratios; their range over the rounds: " + "; ".join(
            f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in r["ratio_range"].items()),
        f"cold load medians: ours {r['cold_load_ms']['ours']:.2f} ms (of which the copy into the slot "
        f"{r['cold_load_ms']['ours_copy_only']:.2f} ms), peft {r['cold_load_ms']['peft']:.2f} ms",
        f"the server's LoRA products: {r['setup']['server_lora_kernel']} (/readyz, after the rounds)",
        f"greedy outputs of the server equal to peft's: {r['greedy_outputs_equal_peft']}" + "".join(
            f"; client {d['client']} parts at token {d['position']}" + (
                "" if d["peft_logit_margin"] is None else
                f", where peft's logit for its token led the server's by {d['peft_logit_margin']:.2e}")
            for d in r.get("greedy_parted", [])) + (
            "" if r["setup"]["dtype"] == "torch.float32" else
            " (in bfloat16 the two round differently: peft keeps LoRA weights and products in float32, the server"
            " only with ADAPTERFORGE_ADAPTER_DTYPE=float32, and their batches differ in shape; greedy tokens can"
            " part where logits nearly tie)"),
        "engine alone (no HTTP; 32 requests submitted at once): adapters {:.0f} tok/s, base {:.0f} tok/s ({:.2f})".format(
            r["engine_alone_tok_s"]["adapters"], r["engine_alone_tok_s"]["base"],
            r["engine_alone_tok_s"]["adapters"] / r["engine_alone_tok_s"]["base"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per load (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one round, one request per client: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (server and peft)")
    parser.add_argument("--spec", choices=sorted(SPECS), default=None, help="model size (default: by device)")
    parser.add_argument("--adapter-dtype", choices=("auto", "float32", "float16"), default="auto",
                        help="the server's ADAPTERFORGE_ADAPTER_DTYPE (default auto)")
    add_common_arguments(parser)
    return run_bench(parser.parse_args(argv), run, report, quiet_loggers=("httpx",))


if __name__ == "__main__":
    sys.exit(main())
