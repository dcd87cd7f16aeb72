"""Benchmark the REST API under concurrent clients against real PostgreSQL and Redis.

One run creates a private PostgreSQL schema, migrates it, seeds a registry of 10,000 adapter
versions (500 adapters x 20 versions, aliases on a tenth of them), starts the API as a real
``uvicorn`` process (``app.main:create_app`` with the tiny demo base model, Redis as the broker, no
worker), and drives it from 32 concurrent ``httpx`` clients:

a. ``GET /adapters?limit=50`` — the first page and pages at cursors spread over the whole list
b. ``POST /jobs`` — a valid LoRA train job on an uploaded dataset (full validation, insert,
   commit, enqueue on Redis)

and prints p50/p99 latency and throughput of each. The load generator shares the machine's cores
with the server, so absolute figures are a floor, not a ceiling. The schema and the Redis queue
are removed afterwards.

    python bench/bench_api.py [--requests 2000] [--clients 32] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _runner import add_common_arguments, run_bench

logger = logging.getLogger("bench")

PG_URL = os.environ.get("ADAPTERFORGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ADAPTERFORGE_BENCH_REDIS", "redis://127.0.0.1:6379/15")
TARGET_MODULES = ["q_proj", "v_proj"]


def _seed(url: str, adapters: int, versions: int) -> None:
    """Bulk-insert ``adapters`` x ``versions`` LoRA versions (files point at no real object: listing only)."""
    from app.registry.models import Adapter, AdapterVersion, Alias, new_id, utcnow

    engine = create_engine(url)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": TARGET_MODULES}
    files = {"adapter_config.json": {"sha256": "0" * 64, "size": 200},
             "adapter_model.safetensors": {"sha256": "1" * 64, "size": 65536}}
    now = utcnow()
    ad_rows, v_rows, al_rows = [], [], []
    for i in range(adapters):
        ad_id = new_id("ad")
        ad_rows.append({"id": ad_id, "name": f"bench-{i:05d}", "method": "lora", "next_version": versions + 1,
                        "created_at": now})
        for v in range(1, versions + 1):
            v_id = new_id("av")
            v_rows.append({"id": v_id, "adapter_id": ad_id, "version": v, "method": "lora", "config": config,
                           "files": files, "size": 65736, "base_model": "bench", "parents": [], "metrics": {},
                           "created_at": now})
            if i % 10 == 0 and v == versions:
                al_rows.append({"adapter_id": ad_id, "alias": "prod", "version_id": v_id, "updated_at": now})
    with engine.begin() as conn:
        conn.execute(insert(Adapter), ad_rows)
        for start in range(0, len(v_rows), 2000):
            conn.execute(insert(AdapterVersion), v_rows[start:start + 2000])
        conn.execute(insert(Alias), al_rows)
        conn.execute(text("ANALYZE"))
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dataset_bytes() -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]
    return "\n".join(json.dumps(r) for r in rows).encode()


async def _drive(base: str, clients: int, total: int, make_request: Any) -> dict[str, Any]:
    """``total`` requests from ``clients`` concurrent clients; latency percentiles and throughput."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = iter(range(total))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            t0 = time.perf_counter()
            response = await make_request(client, i)
            latencies.append(time.perf_counter() - t0)
            if response.status_code >= 300:
                errors[response.status_code] = errors.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "clients": clients,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": 1000 * latencies[-1],
        "requests_per_s": len(latencies) / wall,
        "errors": errors,
    }


async def _run_load(base: str, clients: int, total: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        cursors: list[str | None] = [None]
        page = (await c.get("/adapters", params={"limit": 50})).json()
        while page["has_more"]:
            cursors.append(page["next_cursor"])
            page = (await c.get("/adapters", params={"limit": 50, "after": page["next_cursor"]})).json()
        upload = await c.post("/datasets", files={"file": ("bench.jsonl", _dataset_bytes(), "application/jsonl")})
        upload.raise_for_status()
        dataset_id = upload.json()["id"]
    rng = random.Random(0)

    async def list_page(client: httpx.AsyncClient, i: int) -> httpx.Response:
        cursor = cursors[0] if i % 4 == 0 else rng.choice(cursors)  # a quarter first pages
        params: dict[str, Any] = {"limit": 50}
        if cursor is not None:
            params["after"] = cursor
        return await client.get("/adapters", params=params)

    async def post_job(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"type": "train",
                "adapter": {"name": f"job-{i % 64}", "method": "lora",
                            "config": {"r": 8, "lora_alpha": 16, "target_modules": TARGET_MODULES}},
                "dataset_id": dataset_id, "hyperparameters": {"max_steps": 10, "learning_rate": 1e-4}}
        return await client.post("/jobs", json=body)

    for warm in (list_page, post_job):  # warm connections and code paths
        await _drive(base, clients, clients, warm)
    return {
        "pages": len(cursors),
        "list_adapters": await _drive(base, clients, total, list_page),
        "post_jobs": await _drive(base, clients, total, post_job),
    }


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("API did not become ready")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from adapters_core.tiny_models import ensure_tiny_model
    from app.registry.migrate import upgrade

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            upgrade(url)
            t0 = time.perf_counter()
            _seed(url, args.adapters, args.versions)
            seed_s = time.perf_counter() - t0
            logger.info("seeded %d versions in %.1f s", args.adapters * args.versions, seed_s)
            model_dir = ensure_tiny_model(Path(tmp) / "model")
            port = _free_port()
            env = {**os.environ, "ADAPTERFORGE_DATABASE_URL": url, "ADAPTERFORGE_BROKER_URL": REDIS_URL,
                   "ADAPTERFORGE_DATA_DIR": str(Path(tmp) / "data"), "ADAPTERFORGE_BASE_MODEL": str(model_dir),
                   "ADAPTERFORGE_RECONCILE_INTERVAL_SECONDS": "0", "ADAPTERFORGE_LOG_LEVEL": "WARNING"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", str(args.server_workers), "--log-level", "warning",
                 "--no-access-log"],
                env=env,
            )
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, proc)
            load = asyncio.run(_run_load(base, args.clients, args.requests))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        _purge_redis_queue()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": args.adapters * args.versions,
        "adapters": args.adapters,
        "server_workers": args.server_workers,
        "seed_s": seed_s,
        **load,
        "pass": {"no_errors": not load["list_adapters"]["errors"] and not load["post_jobs"]["errors"]},
    }


def _purge_redis_queue() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def report(r: dict[str, Any]) -> str:
    lines = [
        f"API benchmark — {r['versions']} versions of {r['adapters']} adapters in PostgreSQL, Redis broker, "
        f"{r['server_workers']} uvicorn worker(s), {r['list_adapters']['clients']} concurrent clients, {r['machine']}",
        "",
        "| call                          | requests | p50 ms | p99 ms | max ms | req/s | errors |",
        "|-------------------------------|----------|--------|--------|--------|-------|--------|",
    ]
    for key, label in (("list_adapters", "GET /adapters?limit=50"), ("post_jobs", "POST /jobs (train, LoRA)")):
        m = r[key]
        lines.append(f"| {label:<29} | {m['requests']:>8} | {m['p50_ms']:>6.1f} | {m['p99_ms']:>6.1f} | "
                     f"{m['max_ms']:>6.1f} | {m['requests_per_s']:>5.0f} | {m['errors'] or 'none'} |")
    lines.append(f"\n{r['pages']} pages of 50 adapters; seeding took {r['seed_s']:.1f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--requests", type=int, default=2000, help="requests per call type (default 2000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--adapters", type=int, default=500, help="adapters to seed (default 500)")
    parser.add_argument("--versions", type=int, default=20, help="versions per adapter (default 20)")
    parser.add_argument("--server-workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    return run_bench(parser.parse_args(), run, report, quiet_loggers=("httpx",))


if __name__ == "__main__":
    sys.exit(main())
