"""The user's journey through the HTTP API, shared by the e2e tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.e2e.harness import wait_for

QA = [("What is the capital of France?", "Paris."), ("What colour is the sky?", "Blue."),
      ("How many legs does a spider have?", "Eight."), ("What is 2 plus 2?", "Four.")]


def dataset_jsonl(copies: int = 2) -> bytes:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(copies) for q, a in QA]
    return "\n".join(json.dumps(r) for r in rows).encode()


def upload_dataset(client: httpx.Client) -> str:
    response = client.post("/datasets", files={"file": ("qa.jsonl", dataset_jsonl(), "application/jsonl")})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def submit_train_job(client: httpx.Client, name: str, dataset_id: str, **hyperparameters: Any) -> str:
    hp = {"max_steps": 8, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 2, "packing": False,
          "warmup_ratio": 0.0, **hyperparameters}
    body = {"type": "train", "dataset_id": dataset_id, "hyperparameters": hp,
            "adapter": {"name": name, "method": "lora",
                        "config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    return str(job["id"])


def wait_for_job(client: httpx.Client, job_id: str, logs: Any, timeout: float = 240) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job: dict[str, Any] = wait_for(finished, timeout, f"job {job_id} to finish", logs)
    return job


def event_kinds(client: httpx.Client, job_id: str) -> list[str]:
    page = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()
    return [e["kind"] for e in page["data"]]


def check_registered_and_loadable(client: httpx.Client, name: str, job_id: str, dataset_id: str,
                                  model_dir: Path, tmp: Path) -> None:
    """Version 1 is listed with its lineage, and the download loads in HF peft with our logits."""
    listed = client.get("/adapters", params={"q": name}).json()["data"]
    assert [(a["name"], a["latest_version"]) for a in listed] == [(name, 1)]
    detail = client.get(f"/adapters/{name}/versions/1").json()
    assert detail["lineage"]["job_id"] == job_id and detail["lineage"]["dataset_id"] == dataset_id
    assert detail["metrics"], detail
    archive = client.get(f"/adapters/{name}/versions/1/download")
    assert archive.status_code == 200
    out = tmp / "downloaded"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    folder = next(p.parent for p in out.rglob("adapter_config.json"))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters_core import AdapterModel

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
    ours = AdapterModel(AutoModelForCausalLM.from_pretrained(model_dir))
    ours.load_adapter(folder, "a")
    ours.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            plain = base(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(expected, plain, atol=1e-4), "the trained adapter changes nothing"
    check_served(client, name, theirs, model_dir)


def check_served(client: httpx.Client, name: str, peft_model: Any, model_dir: Path) -> None:
    """The running API serves the trained adapter: greedy tokens equal peft's generate on the download."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = QA[0][0]
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        want = peft_model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    response = client.post("/generate", params={"adapter": name},
                           json={"prompt": prompt, "max_new_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["adapter"] == f"{name}@1" and response.json()["tokens"] == want
