"""JSONL to trained adapter in one call: each data form end to end, memorisation, data errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from adapters_core import AdapterModel, LoraConfig
from adapters_core.training.api import train_adapter
from adapters_core.training.data import DataError
from adapters_core.training.hyperparameters import Hyperparameters
from tests.conftest import load_model

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What is two plus two?", "Four."),
    ("Who are you?", "A tiny model."),
    ("Say hello.", "Hello there!"),
]


def _hp(**kw: Any) -> Hyperparameters:
    base: dict[str, Any] = {"batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                            "warmup_ratio": 0.0, "max_seq_len": 64}
    return Hyperparameters(**{**base, **kw})


def _greedy(am: AdapterModel, tok: Any, question: str) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = am.generate(**enc, max_new_tokens=12, do_sample=False)
    return str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)).strip()


@pytest.mark.parametrize("packing", [True, False])
def test_memorises_chat_answers(tiny_llama_dir: Path, tmp_path: Path, packing: bool) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in PAIRS]
    am = AdapterModel(load_model(tiny_llama_dir))
    before = [_greedy(am, tok, q) for q, _ in PAIRS]  # no adapter yet: the base model's answers
    assert before != [a for _, a in PAIRS]
    out = train_adapter(am, tok, "qa", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), lines,
                        _hp(max_steps=80, packing=packing), tmp_path)
    assert out.result.status == "completed"
    am.eval()
    assert [_greedy(am, tok, q) for q, _ in PAIRS] == [a for _, a in PAIRS]
    # the saved adapter reproduces the answers on a fresh base
    fresh = AdapterModel(load_model(tiny_llama_dir))
    fresh.load_adapter(out.adapter_dir, "qa")
    assert [_greedy(fresh, tok, q) for q, _ in PAIRS] == [a for _, a in PAIRS]


@pytest.mark.parametrize(
    "lines",
    [
        [json.dumps({"prompt": q + " ", "completion": a}) for q, a in PAIRS],
        [json.dumps({"text": f"{q} {a}"}) for q, a in PAIRS],
    ],
    ids=["completion", "text"],
)
def test_completion_and_text_forms_train(tiny_llama_dir: Path, tmp_path: Path, lines: list[str]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    am = AdapterModel(load_model(tiny_llama_dir))
    out = train_adapter(am, tok, "x", LoraConfig(r=8, target_modules="all-linear"), lines, _hp(max_steps=30), tmp_path,
                        validation_split=0.25)
    assert out.result.losses[-1] < out.result.losses[0]
    assert out.result.evals, "validation split was evaluated"
    assert (out.adapter_dir / "adapter_model.safetensors").exists()


def test_bad_data_is_refused_before_training(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    am = AdapterModel(load_model(tiny_llama_dir))
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "{not json"]
    with pytest.raises(DataError) as err:
        train_adapter(am, tok, "x", LoraConfig(r=8), lines, _hp(max_steps=3), tmp_path)
    assert "line 1" in str(err.value) and "line 2" in str(err.value)
    assert am.adapters == [] and not (tmp_path / "adapter").exists()
