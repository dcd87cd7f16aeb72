"""PiSSA / OLoRA adapters made plain LoRAs of the original base (``methods.lora.convert``), proven with HF
PEFT: the converted files, loaded by ``peft`` on an untouched base, compute what the trained adapter
computes on the base its initialisation rewrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft", reason="peft is the test oracle (dev dependency)")

from peft import PeftModel

from adapters_core import AdapterModel, LoraConfig
from adapters_core.errors import ConfigError
from adapters_core.methods.lora.convert import convert_saved, rewrites_base
from adapters_core.peft_format import base_rewriting_init
from tests.conftest import load_model
from tests.core.test_lora_conformance import logits_of, make_ids, maxdiff, perturb_trainable

CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("llama", {"r": 4, "lora_alpha": 8, "init_lora_weights": "olora", "target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"r": 4, "lora_alpha": 6, "init_lora_weights": "pissa", "use_rslora": True, "target_modules":
               ["q_proj", "v_proj", "o_proj"], "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    ("gpt2", {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", "target_modules": ["c_attn", "c_fc"]}),
]


@pytest.mark.parametrize(("arch", "kw"), CASES, ids=["llama-pissa", "llama-olora", "llama-pissa-rslora-patterns",
                                                     "gpt2-pissa"])
def test_converted_adapter_on_the_original_base_is_the_trained_one(
        model_dirs: dict[str, Path], tmp_path: Path, arch: str, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    am = AdapterModel(load_model(model_dirs[arch]))
    am.add_adapter("default", LoraConfig(**kw))
    assert rewrites_base(am.peft_config["default"])
    am.save_adapter(tmp_path / "initial", "default")
    assert perturb_trainable(am) > 0  # "training"
    am.eval()
    ids = make_ids(am.model)
    expected = logits_of(am, ids)  # the trained adapter on the rewritten base
    am.save_adapter(tmp_path / "trained", "default")

    convert_saved(tmp_path / "trained", tmp_path / "initial")

    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert base_rewriting_init(config) is None and config["init_lora_weights"] is True
    assert config["r"] == 2 * kw["r"]
    assert config["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    theirs = PeftModel.from_pretrained(load_model(model_dirs[arch]), tmp_path / "trained").eval()
    assert maxdiff(logits_of(theirs, ids), expected) <= 1e-4
    ours = AdapterModel(load_model(model_dirs[arch]))
    ours.load_adapter(tmp_path / "trained", "x")
    ours.eval()
    assert maxdiff(logits_of(ours, ids), expected) <= 1e-4
    base = load_model(model_dirs[arch])
    assert maxdiff(logits_of(base, ids), expected) > 1e-3  # (the adapter does change the output)


def test_other_adapters_are_left_as_they_are(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    am = AdapterModel(load_model(model_dirs["llama"]))
    am.add_adapter("default", LoraConfig(r=4, target_modules=["q_proj"]))
    am.save_adapter(tmp_path / "a", "default")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    convert_saved(tmp_path / "a", tmp_path / "does-not-matter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_dora_has_no_conversion(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    am = AdapterModel(load_model(model_dirs["llama"]))
    am.add_adapter("default", LoraConfig(r=4, init_lora_weights="pissa", use_dora=True, target_modules=["q_proj"]))
    am.save_adapter(tmp_path / "initial", "default")
    am.save_adapter(tmp_path / "trained", "default")
    with pytest.raises(ConfigError, match="use_dora"):
        convert_saved(tmp_path / "trained", tmp_path / "initial")
