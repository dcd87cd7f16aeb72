"""Base tensors PEFT writes beside an adapter (``save_embedding_layers``): an output head's bias, and tables in the
file's dtype. The server takes them where they are the base model's own, and generates what PEFT generates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_core.errors import AdapterMismatchError
from adapters_core.peft_format import read_adapter
from app.base_model import BaseModelHost
from app.serving.host import ServingHost
from app.serving.sampling import SamplingParams
from app.settings import Settings

peft = pytest.importorskip("peft", reason="peft is the oracle")

from tests.app.serving_helpers import hf_generate, peft_adapter  # noqa: E402
from tests.conftest import load_model  # noqa: E402

PROMPT = "The quick brown fox"


def tiny_phi(out: Path) -> Path:
    """A seeded tiny Phi: its output head has a bias (as Phi's, GPT-J's and CodeGen's do)."""
    from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

    from adapters_core.tiny_models import SPECIAL_TOKENS, build_tokenizer

    build_tokenizer(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       partial_rotary_factor=0.5, bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
                       pad_token_id=ids["<|pad|>"])
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            (param.normal_(0.0, 0.1) if name.endswith("bias") else param.mul_(5) if param.dim() == 2 else param)
    assert model.lm_head.bias is not None
    model.generation_config = GenerationConfig(bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
                                               pad_token_id=ids["<|pad|>"])
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_phi(tmp_path_factory.mktemp("phi"))


def served_tokens(host: ServingHost, folder: Path, key: str, prompt: str, n: int = 10) -> list[int]:
    lease = host.bank.fetch(key, f"{key}@1", lambda: host.prepare_files_of(folder))
    ids = host.encode_prompt(prompt)
    return host.engine.submit(ids, SamplingParams(max_new_tokens=n, temperature=0), lease=lease).wait(60).token_ids


@pytest.fixture(scope="module")
def phi_host(phi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingHost]:
    host = ServingHost.load(Settings(data_dir=tmp_path_factory.mktemp("phi-serving"), base_model=str(phi_dir)))
    host.prepare_files_of = lambda folder: host.slotted.prepare(*read_adapter(folder))  # type: ignore[attr-defined]
    yield host
    host.close()


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj"]])
def test_an_output_head_bias_saved_beside_the_adapter_is_taken_and_served_as_peft_serves_it(
        phi_dir: Path, phi_host: ServingHost, tmp_path: Path, targets: list[str]) -> None:
    """PEFT writes ``lm_head.base_layer.bias`` (LoRA on the head) or ``lm_head.bias`` (save_embedding_layers)
    unchanged beside the adapter; both were refused as unexpected keys, at upload and when served."""
    extra: dict[str, Any] = {} if "lm_head" in targets else {"save_embedding_layers": True}
    folder = tmp_path / "a"
    model = peft.get_peft_model(load_model(phi_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder, **extra)
    from safetensors.torch import load_file

    assert any(k.endswith("lm_head.bias") or k.endswith("lm_head.base_layer.bias") for k in load_file(
        folder / "adapter_model.safetensors"))
    BaseModelHost.load(Settings(data_dir=tmp_path / "d", base_model=str(phi_dir))).check_adapter(folder)  # upload
    from transformers import AutoTokenizer

    want, _ = hf_generate(peft.PeftModel.from_pretrained(load_model(phi_dir), folder).eval(),
                          AutoTokenizer.from_pretrained(phi_dir), PROMPT, 10)
    assert served_tokens(phi_host, folder, f"phi-{len(targets)}", PROMPT) == want


def test_a_head_bias_that_differs_from_the_base_is_refused_naming_it(phi_dir: Path, phi_host: ServingHost,
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "changed"
    model = peft.get_peft_model(load_model(phi_dir), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        model.base_model.model.lm_head.bias.add_(1.0)
    model.save_pretrained(folder, save_embedding_layers=True)
    with pytest.raises(AdapterMismatchError, match=r"lm_head\.bias differs from this base model's lm_head bias"):
        served_tokens(phi_host, folder, "changed", PROMPT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_embedding_adapter_saved_in_16_bits_is_served_within_the_logprob_tolerance(
        demo_model_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """LoRA on embed_tokens makes PEFT write the whole table beside it, rounded to the file's dtype: that is the
    base's own table, not a changed vocabulary (it uploaded, then every generation answered 422)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = peft_adapter(demo_model_dir, tmp_path / "emb", seed=5, r=4, target_modules=["embed_tokens", "q_proj"])
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in load_file(weights))
    host = ServingHost.load(Settings(data_dir=tmp_path / "d", base_model=str(demo_model_dir)))
    try:
        lease = host.bank.fetch("emb", "emb@1", lambda: host.slotted.prepare(*read_adapter(folder)))
        ids = host.encode_prompt(PROMPT)
        got = host.engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0, logprobs=True),
                                 lease=lease).wait(60)
    finally:
        host.close()
    model = peft.PeftModel.from_pretrained(load_model(demo_model_dir), folder).eval()
    want, logprobs = hf_generate(model, AutoTokenizer.from_pretrained(demo_model_dir), PROMPT, 8)
    assert got.token_ids == want
    assert got.logprobs is not None
    assert max(abs(a - b) for a, b in zip(got.logprobs, logprobs, strict=True)) < 1e-4
