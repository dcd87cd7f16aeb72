"""Typed, helpful errors of the LoRA engine (``adapters_core.errors``), and a model left as it was.

Every failure the engine can see coming must raise a subclass of :class:`AdapterError` whose message
names what is wrong (module, key, shapes, field), and a failed ``add_adapter`` / ``load_adapter`` /
``merge`` must not leave a half-changed model behind. ``peft`` only writes reference files here.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

peft = pytest.importorskip("peft", reason="peft writes the reference adapter files")

from peft import IA3Config, get_peft_model  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402

from adapters_core import (  # noqa: E402
    BASE_ADAPTER,
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterModel,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    LoraConfig,
    NonFiniteWeightsError,
    TargetModulesNotFoundError,
    UnknownPeftTypeError,
    UnsafeCheckpointError,
    UnsupportedModuleError,
)
from adapters_core.config import config_from_dict  # noqa: E402
from adapters_core.methods.lora.layer import LoraLayer  # noqa: E402
from tests.conftest import load_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

SEED = 99
QV = ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits_of(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def make_ids(model: nn.Module, batch: int = 3, seq: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(5, int(model.config.vocab_size), (batch, seq), generator=g)


def randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def peft_save(base_dir: Path, out: Path, config: Any, **save_kw: Any) -> Path:
    torch.manual_seed(SEED)
    pm = get_peft_model(load_model(base_dir), config)
    randomise(pm)
    pm.save_pretrained(out, **save_kw)
    return out


class Snapshot:
    """Everything a failed call must leave untouched on an AdapterModel."""

    def __init__(self, am: AdapterModel, ids: torch.Tensor) -> None:
        self.adapters = am.adapters
        self.active = am.active_adapters
        self.state = {k: v.detach().clone() for k, v in am.model.state_dict().items()}
        self.logits = logits_of(am, ids)
        self.ids = ids

    def assert_same_outputs(self, am: AdapterModel) -> None:
        assert am.adapters == self.adapters
        assert am.active_adapters == self.active
        assert torch.equal(logits_of(am, self.ids), self.logits)
        now = am.model.state_dict()
        for k, v in self.state.items():
            if k in now:
                assert torch.equal(now[k], v), f"{k} changed"

    def assert_same_structure(self, am: AdapterModel) -> None:
        assert sorted(am.model.state_dict()) == sorted(self.state), (
            f"new keys: {sorted(set(am.model.state_dict()) - set(self.state))}"
        )


@pytest.fixture
def llama(tiny_llama_dir: Path) -> AdapterModel:
    return AdapterModel(load_model(tiny_llama_dir))


@pytest.fixture
def llama_with_a(tiny_llama_dir: Path) -> AdapterModel:
    am = AdapterModel(load_model(tiny_llama_dir))
    torch.manual_seed(SEED)
    am.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    am.eval()
    return am


@pytest.fixture(scope="module")
def good_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid PEFT LoRA adapter for the tiny Llama (q/v + lm_head copy)."""
    cfg = PeftLoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"], init_lora_weights=False)
    return peft_save(tiny_llama_dir, tmp_path_factory.mktemp("good"), cfg)


def patched_copy(src: Path, dest: Path, **config_updates: Any) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(config_updates)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


# ------------------------------------------------------------------------------------ targeting
@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"target_modules": ["not_a_module"]}, "not_a_module"),
        ({"target_modules": r".*\.nothing_here"}, "nothing_here"),
        ({"target_modules": QV, "exclude_modules": QV}, "excluded"),
        (
            {"target_modules": QV, "layers_to_transform": [7], "layers_pattern": "layers"},
            "layers_to_transform",
        ),
    ],
    ids=["list", "regex", "all-excluded", "layer-out-of-range"],
)
def test_target_modules_matching_nothing(llama_with_a: AdapterModel, kw: dict[str, Any], needle: str) -> None:
    am = llama_with_a
    snap = Snapshot(am, make_ids(am.model))
    with pytest.raises(TargetModulesNotFoundError) as err:
        am.add_adapter("b", LoraConfig(**kw))
    msg = str(err.value)
    assert needle in msg and "matched no module" in msg
    assert "model.layers.0.self_attn.q_proj" in msg  # shows what module names look like
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)
    assert isinstance(err.value, AdapterError)


def test_adapter_for_other_architecture_matches_nothing(
    tiny_gpt2_dir: Path, llama: AdapterModel, tmp_path: Path
) -> None:
    """A GPT-2 adapter (c_attn) loaded into Llama: nothing to attach to."""
    src = peft_save(
        tiny_gpt2_dir,
        tmp_path / "gpt2",
        PeftLoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False),
    )
    snap = Snapshot(llama, make_ids(llama.model))
    with pytest.raises(TargetModulesNotFoundError, match="c_attn"):
        llama.load_adapter(src, "g")
    snap.assert_same_outputs(llama)
    snap.assert_same_structure(llama)


@pytest.mark.parametrize(
    ("arch", "targets", "module", "kind"),
    [
        ("llama", ["q_proj", "input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
        ("llama", ["model.norm"], "model.norm", "LlamaRMSNorm"),
        ("llama", ["rotary_emb"], "rotary_emb", "RotaryEmbedding"),
        ("gpt2", ["c_attn", "ln_1"], "transformer.h.0.ln_1", "LayerNorm"),
        ("gpt2", ["attn"], "transformer.h.0.attn", "GPT2Attention"),
    ],
    ids=["llama-rmsnorm", "llama-final-norm", "llama-rotary", "gpt2-layernorm", "gpt2-attention-block"],
)
def test_unsupported_module_type(
    model_dirs: dict[str, Path], arch: str, targets: list[str], module: str, kind: str
) -> None:
    am = AdapterModel(load_model(model_dirs[arch]))
    snap = Snapshot(am, make_ids(am.model))
    with pytest.raises(UnsupportedModuleError) as err:
        am.add_adapter("x", LoraConfig(target_modules=targets))
    msg = str(err.value)
    assert module in msg and kind in msg
    assert "nn.Linear" in msg  # says what is supported
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)
    assert am.adapters == [] and not any(isinstance(m, LoraLayer) for m in am.modules())


def test_unsupported_variant_on_embedding(llama: AdapterModel) -> None:
    snap = Snapshot(llama, make_ids(llama.model))
    with pytest.raises(UnsupportedModuleError, match="embed_tokens"):
        llama.add_adapter("x", LoraConfig(use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    snap.assert_same_outputs(llama)


def test_modules_to_save_matching_nothing(llama: AdapterModel) -> None:
    with pytest.raises(ConfigError) as err:
        llama.add_adapter("x", LoraConfig(target_modules=QV, modules_to_save=["no_such_head"]))
    assert err.value.field == "modules_to_save" and "no_such_head" in str(err.value)
    assert llama.adapters == []


# ------------------------------------------------------------------------------------ wrong base model
@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters_core.tiny_models import TinyLlamaSpec, build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("big-llama"), TinyLlamaSpec(hidden_size=64, intermediate_size=128)
    )


@pytest.mark.parametrize(
    ("kw", "detail"),
    [
        (
            {"target_modules": QV},
            "model.layers.0.self_attn.q_proj.lora_A.weight: file has (8, 64), this base model needs (8, 32)",
        ),
        (
            {"target_modules": ["embed_tokens"]},
            "model.embed_tokens.lora_embedding_B: file has (64, 8), this base model needs (32, 8)",
        ),
        (
            {"target_modules": ["down_proj"], "use_dora": True},
            "model.layers.0.mlp.down_proj.lora_A.weight: file has (8, 128), this base model needs (8, 64)",
        ),
    ],
    ids=["qv", "embedding", "dora"],
)
def test_adapter_from_bigger_base(
    big_llama_dir: Path, tiny_llama_dir: Path, tmp_path: Path, kw: dict[str, Any], detail: str
) -> None:
    src = peft_save(big_llama_dir, tmp_path / "big", PeftLoraConfig(r=8, init_lora_weights=False, **kw))
    am = AdapterModel(load_model(tiny_llama_dir))
    ids = make_ids(am.model)
    base = logits_of(am, ids)
    snap = Snapshot(am, ids)
    with pytest.raises(AdapterMismatchError) as err:
        am.load_adapter(src, "big")
    assert detail in str(err.value)  # the key, the file's shape and the shape this base needs
    assert am.adapters == [] and am.active_adapter is None
    assert torch.equal(logits_of(am, ids), base)
    snap.assert_same_outputs(am)
    with pytest.raises(AdapterNotFoundError):
        am.set_adapter("big")
    # the name is free again and a fitting adapter loads
    am.add_adapter("big", LoraConfig(**kw))
    assert am.adapters == ["big"]


def test_failed_load_keeps_other_adapters_and_leaves_no_wrappers(
    big_llama_dir: Path, llama_with_a: AdapterModel, tmp_path: Path
) -> None:
    """A failed load next to a loaded adapter: that one keeps working (mixed batches included) and
    no wrapper module the failed load created is left behind."""
    src = peft_save(
        big_llama_dir,
        tmp_path / "big",
        PeftLoraConfig(
            r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False
        ),
    )
    am = llama_with_a
    ids = make_ids(am.model)
    snap = Snapshot(am, ids)
    rows_before = logits_of(am, ids, adapter_names=["a", BASE_ADAPTER, "a"])
    with pytest.raises(AdapterMismatchError):
        am.load_adapter(src, "big")
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)
    assert torch.equal(logits_of(am, ids, adapter_names=["a", BASE_ADAPTER, "a"]), rows_before)


def test_rank_differs_from_config(good_dir: Path, llama: AdapterModel, tmp_path: Path) -> None:
    bad = patched_copy(good_dir, tmp_path / "bad", r=2)
    with pytest.raises(
        AdapterMismatchError, match=r"lora_A\.weight: file has \(4, 32\), this base model needs \(2, 32\)"
    ):
        llama.load_adapter(bad, "x")
    assert llama.adapters == []


def test_missing_and_unexpected_keys(good_dir: Path, llama: AdapterModel, tmp_path: Path) -> None:
    tensors = load_file(good_dir / "adapter_model.safetensors")
    ids = make_ids(llama.model)
    snap = Snapshot(llama, ids)

    missing = tmp_path / "missing"
    shutil.copytree(good_dir, missing)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file(
        {k: v for k, v in tensors.items() if k != dropped},
        missing / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(
        AdapterMismatchError, match=r"missing keys for model\.layers\.1\.self_attn\.v_proj: lora_B"
    ):
        llama.load_adapter(missing, "x")
    snap.assert_same_outputs(llama)

    extra = tmp_path / "extra"
    shutil.copytree(good_dir, extra)
    more = dict(tensors)
    more["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(more, extra / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight"):
        llama.load_adapter(extra, "x")
    snap.assert_same_outputs(llama)


# ------------------------------------------------------------------------------------ config errors
def test_unknown_peft_type(good_dir: Path, llama: AdapterModel, tmp_path: Path) -> None:
    bad = patched_copy(good_dir, tmp_path / "bad", peft_type="NOT_A_METHOD")
    with pytest.raises(UnknownPeftTypeError) as err:
        llama.load_adapter(bad, "x")
    assert err.value.field == "peft_type"
    assert "NOT_A_METHOD" in str(err.value) and "LORA" in str(err.value)  # lists what is supported
    assert isinstance(err.value, ConfigError)

    cfg = json.loads((good_dir / "adapter_config.json").read_text())
    del cfg["peft_type"]
    none = tmp_path / "none"
    shutil.copytree(good_dir, none)
    (none / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownPeftTypeError, match="peft_type"):
        llama.load_adapter(none, "x")
    assert llama.adapters == []


def test_peft_method_this_engine_lacks(tiny_llama_dir: Path, llama: AdapterModel, tmp_path: Path) -> None:
    src = peft_save(
        tiny_llama_dir,
        tmp_path / "ia3",
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(UnknownPeftTypeError, match="IA3") as err:
        llama.load_adapter(src, "x")
    assert err.value.field == "peft_type"
    assert llama.adapters == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trainable_token_indices", [1, 5, 7]),
        ("layer_replication", [[0, 2]]),
        ("use_qalora", True),
        ("alora_invocation_tokens", [5, 6]),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("use_bdlora", {"block_size": 4}),
        ("ensure_weight_tying", True),
    ],
)
def test_unsupported_config_field_in_file(
    good_dir: Path, llama: AdapterModel, tmp_path: Path, field: str, value: Any
) -> None:
    bad = patched_copy(good_dir, tmp_path / "bad", **{field: value})
    snap = Snapshot(llama, make_ids(llama.model))
    with pytest.raises(ConfigError) as err:
        llama.load_adapter(bad, "x")
    assert err.value.field == field
    assert field in str(err.value) and "not supported" in str(err.value)
    snap.assert_same_outputs(llama)
    snap.assert_same_structure(llama)


def test_unsupported_field_from_real_peft_file(
    tiny_llama_dir: Path, llama: AdapterModel, tmp_path: Path
) -> None:
    src = peft_save(
        tiny_llama_dir,
        tmp_path / "tt",
        PeftLoraConfig(r=4, target_modules=QV, trainable_token_indices=[1, 5, 7], init_lora_weights=False),
    )
    with pytest.raises(ConfigError) as err:
        llama.load_adapter(src, "x")
    assert err.value.field == "trainable_token_indices"


@pytest.mark.parametrize(
    ("kw", "field", "needle"),
    [
        ({"r": 0}, "r", "positive integer"),
        ({"r": 2.5}, "r", "2.5"),
        ({"lora_alpha": "big"}, "lora_alpha", "'big'"),
        ({"lora_dropout": 1.0}, "lora_dropout", "1.0"),
        ({"bias": "some"}, "bias", "'some'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "q_proj"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern", "q_proj"),
        ({"target_modules": "(unclosed"}, "target_modules", "(unclosed"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform", "regex"),
        ({"target_modules": QV, "layers_pattern": "layers"}, "layers_pattern", "layers_to_transform"),
        ({"init_lora_weights": "nonsense"}, "init_lora_weights", "nonsense"),
        ({"peft_type": "IA3"}, "peft_type", "IA3"),
        ({"lora_alpha": float("nan")}, "lora_alpha", "finite"),
        ({"lora_alpha": float("inf")}, "lora_alpha", "finite"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern", "finite"),
        ({"use_rslora": "no"}, "use_rslora", "true or false"),
        ({"use_dora": "yes"}, "use_dora", "true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out", "true or false"),
        ({"target_modules": 5}, "target_modules", "5"),
        ({"target_modules": [1, 2]}, "target_modules", "[1, 2]"),
        ({"layers_to_transform": "0"}, "layers_to_transform", "'0'"),
        ({"modules_to_save": "lm_head"}, "modules_to_save", "a list of strings"),
        ({"rank_pattern": [1]}, "rank_pattern", "[1]"),
        ({"task_type": 3}, "task_type", "3"),
        ({"r": True}, "r", "True"),
        ({"rank_pattern": {"(": 8}}, "rank_pattern", "regular expression"),
        ({"alpha_pattern": {"q_proj[": 8}}, "alpha_pattern", "regular expression"),
    ],
    ids=[
        "r0",
        "r-float",
        "alpha-str",
        "dropout-1",
        "bias",
        "rank-pattern",
        "alpha-pattern",
        "bad-regex",
        "regex-with-layers",
        "pattern-without-layers",
        "init",
        "peft-type",
        "alpha-nan",
        "alpha-inf",
        "alpha-pattern-nan",
        "rslora-str",
        "dora-str",
        "fan-in-int",
        "targets-int",
        "targets-int-list",
        "layers-str",
        "modules-to-save-str",
        "rank-pattern-list",
        "task-type-int",
        "r-bool",
        "rank-pattern-bad-regex",
        "alpha-pattern-bad-regex",
    ],
)
def test_invalid_config_values(kw: dict[str, Any], field: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kw)
    assert err.value.field == field, str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize("init", ["eva", "corda", "loftq", "orthogonal"])
def test_init_that_needs_data_is_refused_for_new_adapters(llama: AdapterModel, init: str) -> None:
    cfg = LoraConfig(target_modules=QV, init_lora_weights=init)  # valid to *load* such adapters
    with pytest.raises(ConfigError) as err:
        llama.add_adapter("x", cfg)
    assert err.value.field == "init_lora_weights" and init in str(err.value)
    assert llama.adapters == [] and not any(isinstance(m, LoraLayer) for m in llama.modules())


def test_unknown_future_config_key_is_ignored(good_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Forward compatibility, as PEFT: keys from a newer release are dropped with a warning."""
    newer = patched_copy(good_dir, tmp_path / "newer", some_future_option=3, runtime_config={"x": 1})
    ref = AdapterModel(load_model(tiny_llama_dir))
    ref.load_adapter(good_dir, "x")
    am = AdapterModel(load_model(tiny_llama_dir))
    am.load_adapter(newer, "x")
    ids = make_ids(am.model)
    assert torch.equal(logits_of(am.eval(), ids), logits_of(ref.eval(), ids))


# ------------------------------------------------------------------------------------ file format
def test_pickle_checkpoint_refused_unless_allowed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = PeftLoraConfig(r=4, target_modules=QV, init_lora_weights=False)
    torch.manual_seed(SEED)
    pm = get_peft_model(load_model(tiny_llama_dir), cfg)
    randomise(pm)
    pm.eval()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    ids = make_ids(pm.get_base_model())
    expected = logits_of(pm, ids)

    am = AdapterModel(load_model(tiny_llama_dir))
    snap = Snapshot(am, ids)
    with pytest.raises(UnsafeCheckpointError) as err:
        am.load_adapter(tmp_path, "x")
    assert "adapter_model.bin" in str(err.value) and "allow_pickle" in str(err.value)
    assert isinstance(err.value, AdapterFormatError)
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)

    am.load_adapter(tmp_path, "x", allow_pickle=True)
    am.eval()
    assert float((logits_of(am, ids) - expected).abs().max()) <= 1e-5


def test_safetensors_preferred_over_pickle(good_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(good_dir, both)
    (both / "adapter_model.bin").write_bytes(b"not a pickle: must never be opened")
    am = AdapterModel(load_model(tiny_llama_dir))
    am.load_adapter(both, "x")
    assert am.adapters == ["x"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_adapter_weights_refused(
    good_dir: Path, tiny_llama_dir: Path, tmp_path: Path, bad: float
) -> None:
    tensors = load_file(good_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][1, 3] = bad
    d = tmp_path / "bad"
    shutil.copytree(good_dir, d)
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    am = AdapterModel(load_model(tiny_llama_dir))
    snap = Snapshot(am, make_ids(am.model))
    with pytest.raises(NonFiniteWeightsError) as err:
        am.load_adapter(d, "x")
    assert key in str(err.value)
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)


def test_unreadable_adapter_directories(good_dir: Path, llama: AdapterModel, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json"):
        llama.load_adapter(tmp_path / "does-not-exist", "x")

    broken_json = tmp_path / "json"
    shutil.copytree(good_dir, broken_json)
    (broken_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        llama.load_adapter(broken_json, "x")

    not_object = tmp_path / "list"
    shutil.copytree(good_dir, not_object)
    (not_object / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFormatError):
        llama.load_adapter(not_object, "x")

    no_weights = tmp_path / "noweights"
    shutil.copytree(good_dir, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        llama.load_adapter(no_weights, "x")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good_dir, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterFormatError, match="safetensors"):
        llama.load_adapter(corrupt, "x")
    assert llama.adapters == []


# ------------------------------------------------------------------------------------ merging
def test_safe_merge_overflow_leaves_base_untouched(tiny_llama_dir: Path) -> None:
    am = AdapterModel(load_model(tiny_llama_dir))
    torch.manual_seed(SEED)
    am.add_adapter("big", LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    am.eval()
    last = am.model.get_submodule("model.layers.1.self_attn.v_proj")
    assert isinstance(last, LoraLayer)
    with torch.no_grad():  # finite tensors whose product overflows float32: s·B·A ≈ 4e40
        last.lora_A["big"].fill_(1e20)
        last.lora_B["big"].fill_(1e20)
    base_before = {k: v.detach().clone() for k, v in am.model.state_dict().items() if ".lora_" not in k}

    with pytest.raises(NonFiniteWeightsError) as err:
        am.merge_adapter(safe_merge=True)
    assert "big" in str(err.value)
    assert am.merged_adapters == []
    with pytest.raises(NonFiniteWeightsError):
        am.merge_and_unload(safe_merge=True)
    assert am.adapters == ["big"] and am.merged_adapters == []
    after = am.model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"{k} was written by a refused safe merge"


def test_merge_lora_bias_without_base_bias(tiny_llama_dir: Path) -> None:
    am = AdapterModel(load_model(tiny_llama_dir))
    am.add_adapter("lb", LoraConfig(r=4, target_modules=QV, lora_bias=True, init_lora_weights=False))
    am.eval()
    ids = make_ids(am.model)
    snap = Snapshot(am, ids)
    with pytest.raises(AdapterStateError, match="bias"):
        am.merge_adapter()
    assert am.merged_adapters == []
    snap.assert_same_outputs(am)


def test_operations_that_do_not_fit_merged_state(llama_with_a: AdapterModel) -> None:
    am = llama_with_a
    ids = make_ids(am.model)
    am.merge_adapter()
    with pytest.raises(AdapterStateError, match="merged"):
        logits_of(am, ids, adapter_names=["a", "a", BASE_ADAPTER])
    with pytest.raises(AdapterStateError, match="merged"):
        am.delete_adapter("a")
    am.unmerge_adapter()
    am.delete_adapter("a")
    assert am.adapters == []


# ------------------------------------------------------------------------------------ names
def test_duplicate_adapter_name(llama_with_a: AdapterModel, good_dir: Path) -> None:
    am = llama_with_a
    snap = Snapshot(am, make_ids(am.model))
    with pytest.raises(AdapterExistsError, match="'a'"):
        am.add_adapter("a", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(AdapterExistsError, match="'a'"):
        am.load_adapter(good_dir, "a")
    snap.assert_same_outputs(am)
    snap.assert_same_structure(am)


@pytest.mark.parametrize("name", [BASE_ADAPTER, "", "has space", "a/b", "../up", "x.y", "training", "forward"])
def test_invalid_adapter_name(llama: AdapterModel, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        llama.add_adapter(name, LoraConfig(target_modules=QV))
    assert err.value.field == "name"
    assert llama.adapters == [] and not any(isinstance(m, LoraLayer) for m in llama.modules())


def test_unknown_adapter_names(llama_with_a: AdapterModel) -> None:
    am = llama_with_a
    ids = make_ids(am.model)
    with pytest.raises(AdapterNotFoundError) as err:
        logits_of(am, ids, adapter_names=["a", "nope", BASE_ADAPTER])
    assert "'nope'" in str(err.value) and "'a'" in str(err.value)  # names the unknown one and what is loaded
    assert isinstance(err.value, KeyError) and isinstance(err.value, AdapterError)
    with pytest.raises(AdapterNotFoundError, match="nope"):
        am.set_adapter("nope")
    with pytest.raises(AdapterNotFoundError, match="nope"):
        am.set_adapter(["a", "nope"])
    assert am.active_adapter == "a"
    with pytest.raises(AdapterNotFoundError):
        am.delete_adapter("nope")
    with pytest.raises(AdapterNotFoundError):
        am.merge_adapter(["nope"])
    with pytest.raises(AdapterNotFoundError):
        am.adapter_state_dict("nope")
    assert am.state.rows is None  # a failed routing does not stick


@pytest.mark.parametrize(
    "rows", [["a", "a"], ["a", BASE_ADAPTER, "a", "a"], ["a"]], ids=["short", "long", "one"]
)
def test_adapter_names_wrong_length(llama_with_a: AdapterModel, rows: list[str]) -> None:
    am = llama_with_a
    ids = make_ids(am.model, batch=3)
    with pytest.raises(AdapterStateError, match=rf"{len(rows)} entries but the batch has 3 rows"):
        logits_of(am, ids, adapter_names=rows)
    assert am.state.rows is None
    assert logits_of(am, ids, adapter_names=["a", BASE_ADAPTER, "a"]).shape[0] == 3


def test_adapter_names_wrong_length_base_rows_only(llama_with_a: AdapterModel) -> None:
    am = llama_with_a
    ids = make_ids(am.model, batch=3)
    with pytest.raises(AdapterStateError):
        logits_of(am, ids, adapter_names=[BASE_ADAPTER, BASE_ADAPTER])


def test_every_error_is_an_adapter_error() -> None:
    for cls in (
        ConfigError,
        UnknownPeftTypeError,
        TargetModulesNotFoundError,
        UnsupportedModuleError,
        AdapterNotFoundError,
        AdapterExistsError,
        AdapterFormatError,
        UnsafeCheckpointError,
        AdapterMismatchError,
        NonFiniteWeightsError,
        AdapterStateError,
    ):
        assert issubclass(cls, AdapterError)


def test_an_adapter_on_a_weightless_model_stays_weightless(tiny_llama_dir: Path) -> None:
    """Checking a config against an architecture on ``meta`` allocates nothing (the service relies on it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    am = AdapterModel(skeleton)
    am.add_adapter("probe", LoraConfig(r=8, target_modules="all-linear"))
    devices = {p.device.type for name, p in am.named_parameters() if "lora_" in name}
    assert devices == {"meta"}


PEFT_CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "null patterns and loftq (PEFT's Optional fields)": {"rank_pattern": None, "alpha_pattern": None,
                                                          "loftq_config": None},
    "all-linear": {"target_modules": "all-linear", "r": 16, "lora_alpha": 32},
    "regex": {"target_modules": r".*\.(q|v)_proj", "lora_dropout": 0.05},
    "patterns": {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 3}},
    "layers": {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    "layers as int": {"target_modules": ["q_proj"], "layers_to_transform": 1},
    "dora + rslora": {"target_modules": ["q_proj"], "use_dora": True, "use_rslora": True},
    "modules_to_save + bias": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "bias": "lora_only"},
    "exclude": {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    "init pissa": {"target_modules": ["q_proj"], "init_lora_weights": "pissa_niter_4"},
    "init gaussian, task type": {"target_modules": ["q_proj"], "init_lora_weights": "gaussian", "task_type": "CAUSAL_LM"},
}


@pytest.mark.parametrize("kw", list(PEFT_CONFIGS.values()), ids=list(PEFT_CONFIGS))
def test_configs_peft_writes_load(kw: dict[str, Any], tmp_path: Path) -> None:
    """What PEFT's own ``LoraConfig(...).save_pretrained`` writes loads here, and means the same."""
    PeftLoraConfig(**kw).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config = config_from_dict(data)
    assert isinstance(config, LoraConfig)
    for key in ("r", "lora_alpha", "use_dora", "use_rslora", "bias", "layers_to_transform"):
        assert getattr(config, key) == data[key], key
    assert config.rank_pattern == (data["rank_pattern"] or {}) and config.alpha_pattern == (data["alpha_pattern"] or {})
