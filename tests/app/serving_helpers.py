"""Helpers of the inference tests: PEFT adapters for the demo model, uploads, apps with serving on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.registry.migrate import upgrade
from app.settings import Settings
from tests.app.conftest import RecordingQueue
from tests.conftest import load_model

PROMPTS = ["What is the capital of France?", "hello there", "The quick brown fox", "def add(a, b):"]


def peft_adapter(base_dir: Path, out: Path, *, seed: int, r: int = 8, target_modules: Any = "all-linear",
                 **extra: Any) -> Path:
    """A LoRA adapter written by HF PEFT for the model in ``base_dir``, with weights far from the identity
    (greedy outputs of different adapters differ)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(load_model(base_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                                                        init_lora_weights=False, **extra))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    pm.save_pretrained(out)
    return out


def sentencepiece_style_model(out: Path, seed: int = 0) -> Path:
    """A tiny seeded Llama whose tokenizer decodes as Llama-2's and Mistral's do (Metaspace: ``▁`` marks a
    space, and a decode drops the space ``▁`` gives its first token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from adapters_core.tiny_models import _CORPUS, CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                                     show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    vocab = fast.get_vocab()
    ids = {t: int(vocab[t]) for t in SPECIAL_TOKENS}
    eos = [ids["<|eos|>"], ids["<|im_end|>"]]
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=ids["<|bos|>"], eos_token_id=eos, pad_token_id=ids["<|pad|>"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<|bos|>"], eos_token_id=eos,
                                               pad_token_id=ids["<|pad|>"])
    model.save_pretrained(out)
    return out


def upload(client: TestClient, name: str, folder: Path) -> Any:
    files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    response = client.post("/adapters", files=[("name", (None, name)), *files])
    assert response.status_code == 201, response.text
    return response.json()


def serving_settings(tmp: Path, demo_model_dir: Path, **overrides: Any) -> Settings:
    url = f"sqlite:///{tmp / 'af.db'}"
    upgrade(url)
    values: dict[str, Any] = {"data_dir": tmp / "data", "database_url": url, "base_model": str(demo_model_dir),
                              "reconcile_interval_seconds": 0, "adapter_slots": 16, **overrides}
    return Settings(**values)


@contextmanager
def served_app(settings: Settings, base_host: Any) -> Iterator[TestClient]:
    """A TestClient whose app loads the base model for inference (closed on exit)."""
    app = create_app(settings, queue=RecordingQueue(), base_model=base_host)
    with TestClient(app) as client:
        yield client


def hf_generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ``generate`` of an HF (or PEFT) model: the new tokens and their raw log-probabilities."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[t]) for step, t in zip(out.logits, new, strict=True)]
    return new, logprobs


def sse_events(response: Any) -> list[tuple[str, Any]]:
    """``(event, data)`` of each server-sent event of ``response`` (``message`` where none is named); the data
    parsed as JSON, except OpenAI's closing ``[DONE]``, kept as that string."""
    events, kind = [], "message"
    for line in response.text.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            raw = line[len("data: "):]
            events.append((kind, raw if raw == "[DONE]" else json.loads(raw)))
            kind = "message"
    return events
