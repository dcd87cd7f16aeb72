"""The local model builders: seeded, loadable through from_pretrained, right architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from adapters_core.tiny_models import build_tiny_llama, ensure_tiny_model


def test_llama_has_grouped_query_attention(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32
    assert attn.k_proj.out_features == 16  # 2 kv heads x head_dim 8: fewer than the 4 query heads
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_gpt2_uses_conv1d(tiny_gpt2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_tokenizer_round_trips_text_and_has_chat_template(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "What is the capital of France? Paris."
    assert tok.decode(tok(text).input_ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token == "<|pad|>"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, tiny_llama_dir: Path) -> None:
    again = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "again", seed=0))
    other = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "other", seed=1))
    first = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(first.state_dict()[w], other.state_dict()[w])


def test_ensure_tiny_model_builds_once(tmp_path: Path) -> None:
    path = ensure_tiny_model(tmp_path / "demo", arch="gpt2")
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "demo", arch="gpt2") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
