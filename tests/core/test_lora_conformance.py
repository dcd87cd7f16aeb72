"""Differential conformance of the engine's LoRA with HF PEFT 0.21.2 (``peft`` is only the test oracle).

Every case of :data:`CASES` is a LoRA config written with HF PEFT's field names, run on a tiny Llama
(``nn.Linear``, grouped-query attention) or a tiny GPT-2 (``Conv1D``, biases, tied embeddings). Adapters
are never the identity: ``init_lora_weights=False`` (or a base-modifying init) and then every trainable
tensor (LoRA A/B, DoRA magnitude, ``lora_B`` bias, ``modules_to_save`` copies, biases under
``bias="all"/"lora_only"``) gets seeded noise, so each comparison below can fail.

Per case:

1. PEFT saves → ``AdapterModel.load_adapter`` gives PEFT's logits (<= 1e-5, DoRA included);
2. ``AdapterModel.add_adapter`` + ``save_adapter`` → ``peft.PeftModel.from_pretrained`` gives the engine's
   logits; file keys/shapes/dtypes, safetensors metadata and ``adapter_config.json`` equal PEFT's own save;
3. merged == unmerged (1e-4), ``merge_and_unload`` returns a plain model equal to PEFT's merged model;
4. ``disable_adapters`` gives the base logits and restores; ``unload`` gives the base model back.

PiSSA / OLoRA rewrite the base weight to ``W - s·B·A``: the base of every comparison is then the
residual model of the same lifecycle (PEFT's for files PEFT wrote, the engine's for files it wrote).
PEFT re-runs the PiSSA/OLoRA decomposition when it *loads* such an adapter (subtracting ``s·B·A`` a
second time), so files are fed to PEFT with ``init_lora_weights`` set to ``true``, which is what PEFT's
own ``path_initial_model_for_weight_conversion`` does.

Mixed batches (one adapter per row, ``"__base__"`` rows, DoRA next to plain LoRA, different ranks,
``lora_bias``, embedding LoRA, ``modules_to_save``) are checked row by row against ``set_adapter`` runs
on both forward paths (stacked bank under ``no_grad``, per-adapter row groups with gradients), and
against PEFT for the adapters PEFT can mix (it refuses DoRA in mixed batches).
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft", reason="peft is the test oracle for the LoRA conformance suite")

from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from adapters_core import (  # noqa: E402
    BASE_ADAPTER,
    AdapterModel,
    AdapterNotFoundError,
    AdapterStateError,
    LoraConfig,
)
from adapters_core.methods.lora.layer import LoraLayer  # noqa: E402
from adapters_core.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from tests.conftest import load_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

SEED = 1234
ATOL = 1e-5  # engine vs PEFT, unmerged, float32 (plain LoRA and DoRA alike)
MERGE_ATOL = 1e-4  # merged vs unmerged: W + s·B·A is rounded once more
BASE_ATOL = 1e-6  # disabled / unloaded vs base
MIN_EFFECT = 1e-3  # an adapter must move the logits by more than this, or the test could not fail
NOISE = 0.05  # seeded noise added to every trainable tensor (makes DoRA magnitudes and biases matter)

IGNORED_CONFIG_KEYS = {"peft_version", "base_model_name_or_path"}
UNORDERED_CONFIG_KEYS = {"target_modules", "exclude_modules"}  # PEFT stores these as sets
BASE_MODIFYING_INITS = ("pissa", "olora")


# ------------------------------------------------------------------------------------ case table
@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # "llama" (nn.Linear, GQA) or "gpt2" (Conv1D, biases)
    kw: dict[str, Any]
    atol: float = ATOL
    can_merge: bool = True  # lora_bias needs a base bias to merge into (PEFT refuses too)
    # LoRA on an embedding tied to lm_head: PEFT 0.21.2's merge also changes the head (merged != unmerged);
    # the engine unties first, so its merged model must equal the unmerged adapter instead
    tied_embedding: bool = False
    xfail: dict[str, str] = field(default_factory=dict)  # test key -> engine bug it shows (strict xfail)

    @property
    def config_kwargs(self) -> dict[str, Any]:
        return {"init_lora_weights": False, **self.kw}

    @property
    def modifies_base(self) -> bool:
        init = self.config_kwargs["init_lora_weights"]
        return isinstance(init, str) and init.startswith(BASE_MODIFYING_INITS)


QV = ["q_proj", "v_proj"]
CASES = [
    Case("llama-r8-qv", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    Case("gpt2-r8-c_attn", "gpt2", {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}),
    Case("llama-all-linear", "llama", {"r": 4, "target_modules": "all-linear"}),
    Case("gpt2-all-linear", "gpt2", {"r": 4, "target_modules": "all-linear"}),
    Case(
        "llama-regex",
        "llama",
        {"r": 4, "target_modules": r".*layers\.1\.(self_attn\.(k|o)_proj|mlp\.down_proj)"},
    ),
    Case("gpt2-regex", "gpt2", {"r": 4, "target_modules": r"transformer\.h\.0\.(attn\.c_proj|mlp\.c_fc)"}),
    Case(
        "llama-exclude-list",
        "llama",
        {
            "r": 4,
            "target_modules": ["q_proj", "k_proj", "v_proj"],
            "exclude_modules": ["k_proj", "model.layers.1.self_attn.q_proj"],
        },
    ),
    Case(
        "llama-exclude-regex",
        "llama",
        {"r": 4, "target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"},
    ),
    Case(
        "llama-layers",
        "llama",
        {
            "r": 4,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    Case(  # PEFT reads an empty pattern as none (the default layer names)
        "llama-layers-empty-pattern",
        "llama",
        {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": ""},
    ),
    Case(
        "gpt2-layers",
        "gpt2",
        {"r": 4, "target_modules": ["c_attn", "c_fc"], "layers_to_transform": 0, "layers_pattern": "h"},
    ),
    Case(
        "llama-rank-alpha-pattern",
        "llama",
        {
            "r": 8,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "rank_pattern": {"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 3},
            "alpha_pattern": {"o_proj": 32, "k_proj": 5},
        },
    ),
    Case(
        "gpt2-rank-alpha-pattern",
        "gpt2",
        {
            "r": 4,
            "target_modules": ["c_attn", "c_fc"],
            "rank_pattern": {"h.1.attn.c_attn": 6},
            "alpha_pattern": {"c_fc": 2},
        },
    ),
    Case("llama-rslora", "llama", {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": QV}),
    Case(
        "llama-dora", "llama", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    ),
    Case("gpt2-dora", "gpt2", {"r": 4, "use_dora": True, "target_modules": ["c_attn", "c_fc"]}),
    Case(
        "llama-dora-rslora-mts-causal",
        "llama",
        {
            "r": 4,
            "use_dora": True,
            "use_rslora": True,
            "target_modules": QV,
            "modules_to_save": ["lm_head"],
            "task_type": "CAUSAL_LM",
        },
    ),
    Case("gpt2-bias-all", "gpt2", {"r": 4, "bias": "all", "target_modules": ["c_attn"]}),
    Case(
        "gpt2-bias-lora-only", "gpt2", {"r": 4, "bias": "lora_only", "target_modules": ["c_attn", "c_proj"]}
    ),
    Case("gpt2-lora-bias", "gpt2", {"r": 4, "lora_bias": True, "target_modules": ["c_attn", "c_fc"]}),
    Case("llama-lora-bias", "llama", {"r": 4, "lora_bias": True, "target_modules": QV}, can_merge=False),
    Case("llama-modules-to-save", "llama", {"r": 8, "target_modules": QV, "modules_to_save": ["lm_head"]}),
    Case(  # PEFT's suffix rule: `norm` also saves input_layernorm and post_attention_layernorm
        "llama-modules-to-save-norm", "llama", {"r": 4, "target_modules": QV, "modules_to_save": ["norm"]}
    ),
    Case(
        "gpt2-modules-to-save-ln_f",
        "gpt2",
        {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"]},
    ),
    Case("llama-embed_tokens", "llama", {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}),
    Case(
        "gpt2-wte",
        "gpt2",
        {"r": 4, "target_modules": ["wte", "c_attn"]},
        tied_embedding=True,
    ),
    Case(  # LoRA on a head tied to the embedding: PEFT saves the shared table under lm_head.base_layer.weight
        "gpt2-lm_head-tied",
        "gpt2",
        {"r": 4, "target_modules": ["lm_head"]},
        tied_embedding=True,
    ),
    Case("llama-dropout", "llama", {"r": 8, "lora_dropout": 0.3, "target_modules": QV}),
    Case("gpt2-dropout", "gpt2", {"r": 8, "lora_dropout": 0.3, "target_modules": ["c_attn", "c_fc"]}),
    Case("llama-default-targets", "llama", {"r": 4, "target_modules": None}),
    Case("gpt2-default-targets", "gpt2", {"r": 4, "target_modules": None, "task_type": "CAUSAL_LM"}),
    Case("llama-gaussian", "llama", {"r": 4, "init_lora_weights": "gaussian", "target_modules": QV}),
    Case(
        "llama-pissa", "llama", {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", "target_modules": QV}
    ),
    Case("gpt2-pissa", "gpt2", {"r": 4, "init_lora_weights": "pissa", "target_modules": ["c_attn", "c_fc"]}),
    Case(
        "llama-olora",
        "llama",
        {"r": 4, "init_lora_weights": "olora", "target_modules": ["q_proj", "down_proj"]},
    ),
    # no gpt2-olora here: PEFT 0.21.2's OLoRA ignores fan_in_fan_out and builds wrongly shaped A/B for Conv1D
    # (its forward then fails), so it cannot be the oracle; test_init_olora_conv1d checks the engine directly.
]


# ------------------------------------------------------------------------------------ helpers
def logits_of(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def make_ids(model: nn.Module, batch: int = 3, seq: int = 8, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, int(model.config.vocab_size), (batch, seq), generator=g)


def perturb_trainable(module: nn.Module, seed: int = SEED) -> int:
    """Add seeded noise to every ``requires_grad`` tensor; returns how many tensors changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * NOISE)
                n += 1
    return n


def peft_config(case: Case) -> PeftLoraConfig:
    return PeftLoraConfig(**copy.deepcopy(case.config_kwargs))


def engine_config(case: Case) -> LoraConfig:
    return LoraConfig(**copy.deepcopy(case.config_kwargs))


def expect_failure(request: pytest.FixtureRequest, case: Case, key: str) -> None:
    """Mark this test a strict xfail when ``case`` documents an engine bug under ``key``."""
    if key in case.xfail:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=case.xfail[key]))


def engine_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer | ModulesToSaveWrapper)]


def base_with_state(path: Path, state: dict[str, torch.Tensor] | None) -> nn.Module:
    model = load_model(path)
    if state is not None:
        model.load_state_dict(state)
    return model


def saved_tensors(directory: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
        specs = {}
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            t = f.get_tensor(k)
            specs[k] = (tuple(t.shape), t.dtype)
    return specs, meta


def normalised_config(directory: Path) -> dict[str, Any]:
    data = json.loads((directory / "adapter_config.json").read_text())
    for key in IGNORED_CONFIG_KEYS:
        data.pop(key, None)
    for key in UNORDERED_CONFIG_KEYS:
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    return data


def for_peft_loading(directory: Path, dest: Path) -> Path:
    """A copy of ``directory`` that PEFT loads without re-running a base-modifying init (see module doc)."""
    shutil.copytree(directory, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_MODIFYING_INITS):
        cfg["init_lora_weights"] = True
        (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dest


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Tiny matmuls: one intra-op thread is faster, and does not collapse when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class PeftRun:
    """What PEFT itself produced for one case (built once per case)."""

    case: Case
    base_dir: Path
    ids: torch.Tensor
    save_dir: Path
    logits: torch.Tensor  # PEFT, adapter active
    disabled_logits: torch.Tensor  # PEFT, adapters disabled (base incl. biases the adapter carries)
    merged_logits: torch.Tensor  # PEFT's merge_and_unload
    base_logits: torch.Tensor  # the base the adapter applies to (residual for PiSSA/OLoRA)
    base_state: dict[str, torch.Tensor] | None  # residual base weights, when the init rewrote them
    extra: dict[str, Any] = field(default_factory=dict)

    def fresh_base(self) -> nn.Module:
        return base_with_state(self.base_dir, self.base_state)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def ref(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> PeftRun:
    case: Case = request.param
    base_dir = model_dirs[case.arch]
    torch.manual_seed(SEED)
    pm = get_peft_model(load_model(base_dir), peft_config(case))
    assert perturb_trainable(pm) > 0
    pm.eval()
    ids = make_ids(pm.get_base_model())
    out = tmp_path_factory.mktemp(f"peft-{case.id}")
    pm.save_pretrained(out)
    lg = logits_of(pm, ids)
    with pm.disable_adapter():
        disabled = logits_of(pm, ids)
    base_state = None
    if case.modifies_base:
        base_state = {k: v.detach().clone() for k, v in copy.deepcopy(pm).unload().state_dict().items()}
    merged = logits_of(copy.deepcopy(pm).merge_and_unload(), ids) if case.can_merge else lg
    base_logits = logits_of(base_with_state(base_dir, base_state), ids)
    return PeftRun(case, base_dir, ids, out, lg, disabled, merged, base_logits, base_state)


@dataclass
class EngineRun:
    save_dir: Path
    logits: torch.Tensor
    base_state: dict[str, torch.Tensor] | None


@pytest.fixture(scope="module")
def eng(ref: PeftRun, tmp_path_factory: pytest.TempPathFactory) -> EngineRun:
    """The engine creates the same config with ``add_adapter`` (own seeded weights) and saves it."""
    case = ref.case
    am = AdapterModel(load_model(ref.base_dir))
    torch.manual_seed(SEED)
    am.add_adapter("default", engine_config(case))
    assert perturb_trainable(am) > 0
    am.eval()
    lg = logits_of(am, ref.ids)
    out = am.save_adapter(tmp_path_factory.mktemp(f"engine-{case.id}"), "default")
    base_state = None
    if case.modifies_base:
        base_state = {k: v.detach().clone() for k, v in copy.deepcopy(am).unload().state_dict().items()}
    return EngineRun(Path(out), lg, base_state)


def load_engine(ref: PeftRun, name: str = "x") -> AdapterModel:
    am = AdapterModel(ref.fresh_base())
    am.load_adapter(ref.save_dir, name)
    am.eval()
    return am


# ------------------------------------------------------------------------------------ (1) PEFT → engine
def test_peft_adapter_loads_with_same_logits(ref: PeftRun) -> None:
    am = load_engine(ref)
    assert am.adapters == ["x"] and am.active_adapter == "x"
    got = logits_of(am, ref.ids)
    assert maxdiff(ref.logits, ref.base_logits) > MIN_EFFECT, (
        "the adapter does not change the model: vacuous case"
    )
    assert maxdiff(got, ref.base_logits) > MIN_EFFECT
    assert maxdiff(got, ref.logits) <= ref.case.atol


def test_loaded_adapter_is_frozen(ref: PeftRun) -> None:
    am = load_engine(ref)
    assert am.trainable_parameters() == []
    assert all(not p.requires_grad for p in am.parameters())
    assert torch.equal(logits_of(am, ref.ids), logits_of(am, ref.ids))  # eval: dropout off, deterministic


# ------------------------------------------------------------------------------------ (2) engine → PEFT
def test_engine_adapter_loads_in_peft_with_same_logits(ref: PeftRun, eng: EngineRun, tmp_path: Path) -> None:
    base = base_with_state(ref.base_dir, eng.base_state)
    base_logits = logits_of(base, ref.ids)
    assert maxdiff(eng.logits, base_logits) > MIN_EFFECT
    pm = PeftModel.from_pretrained(base, for_peft_loading(eng.save_dir, tmp_path / "a")).eval()
    assert maxdiff(logits_of(pm, ref.ids), eng.logits) <= ref.case.atol


def test_engine_files_match_peft_files(ref: PeftRun, eng: EngineRun, request: pytest.FixtureRequest) -> None:
    expect_failure(request, ref.case, "files")
    ours, our_meta = saved_tensors(eng.save_dir)
    theirs, their_meta = saved_tensors(ref.save_dir)
    assert our_meta == {"format": "pt"} == their_meta
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert sorted(ours) == sorted(theirs), (
        f"only in engine file: {only_ours}; only in PEFT file: {only_theirs}"
    )
    assert ours == theirs  # shapes and dtypes per key


def test_engine_config_json_matches_peft(ref: PeftRun, eng: EngineRun) -> None:
    ours, theirs = normalised_config(eng.save_dir), normalised_config(ref.save_dir)
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert sorted(ours) == sorted(theirs), f"only in engine config: {only_ours}; only in PEFT: {only_theirs}"
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert diff == {}, f"(engine, PEFT) values differ: {diff}"
    raw = json.loads((eng.save_dir / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["inference_mode"] is True


def test_engine_reloads_its_own_save(ref: PeftRun, eng: EngineRun) -> None:
    am = AdapterModel(base_with_state(ref.base_dir, eng.base_state))
    am.load_adapter(eng.save_dir, "again")
    am.eval()
    assert maxdiff(logits_of(am, ref.ids), eng.logits) <= ref.case.atol


# ------------------------------------------------------------------------------------ (3) merging
def test_merge_equals_unmerged(ref: PeftRun, request: pytest.FixtureRequest) -> None:
    am = load_engine(ref)
    unmerged = logits_of(am, ref.ids)
    if not ref.case.can_merge:
        with pytest.raises(AdapterStateError, match="bias"):
            am.merge_adapter()
        assert am.merged_adapters == []
        assert torch.equal(logits_of(am, ref.ids), unmerged)
        return
    expect_failure(request, ref.case, "merge")
    am.merge_adapter()
    assert am.merged_adapters == ["x"]
    assert maxdiff(logits_of(am, ref.ids), unmerged) <= MERGE_ATOL


def test_merge_disable_unmerge_cycle(ref: PeftRun) -> None:
    """Merged state: disable_adapters takes the merge out and puts it back; unmerge / unload restore."""
    if not ref.case.can_merge:
        pytest.skip(
            "lora_bias on a layer without bias cannot be merged (checked in test_merge_equals_unmerged)"
        )
    am = load_engine(ref)
    am.merge_adapter()
    merged = logits_of(am, ref.ids)
    with am.disable_adapters():
        assert am.merged_adapters == []
        assert maxdiff(logits_of(am, ref.ids), ref.disabled_logits) <= MERGE_ATOL
    assert am.merged_adapters == ["x"]
    assert maxdiff(logits_of(am, ref.ids), merged) <= MERGE_ATOL
    am.unmerge_adapter()
    assert am.merged_adapters == []
    assert maxdiff(logits_of(am, ref.ids), ref.logits) <= MERGE_ATOL
    am.merge_adapter()
    model = am.unload()  # takes merged adapters out first
    assert engine_modules(model) == []
    assert maxdiff(logits_of(model, ref.ids), ref.disabled_logits) <= MERGE_ATOL


def test_merge_and_unload_matches_peft(ref: PeftRun) -> None:
    if not ref.case.can_merge:
        pytest.skip("lora_bias on a layer without bias cannot be merged (PEFT refuses too)")
    am = load_engine(ref)
    plain = am.merge_and_unload()
    assert engine_modules(plain) == [] and am.adapters == []
    assert not any(
        ".lora_" in n or "base_layer" in n or "modules_to_save" in n for n, _ in plain.named_parameters()
    )
    assert type(plain).__module__.startswith("transformers.")
    merged = logits_of(plain, ref.ids)
    expected = ref.logits if ref.case.tied_embedding else ref.merged_logits
    assert maxdiff(merged, expected) <= MERGE_ATOL
    assert maxdiff(merged, ref.base_logits) > MIN_EFFECT


def test_safe_merge_of_finite_adapter(ref: PeftRun) -> None:
    if not ref.case.can_merge:
        pytest.skip("lora_bias on a layer without bias cannot be merged")
    am = load_engine(ref)
    plain = am.merge_and_unload(safe_merge=True)
    expected = ref.logits if ref.case.tied_embedding else ref.merged_logits
    assert maxdiff(logits_of(plain, ref.ids), expected) <= MERGE_ATOL


# ------------------------------------------------------------------------------------ (5) disable / unload
def test_disable_adapters_then_unload_restores_base(ref: PeftRun) -> None:
    am = load_engine(ref)
    on = logits_of(am, ref.ids)
    with am.disable_adapters():
        off = logits_of(am, ref.ids)
    assert maxdiff(off, ref.disabled_logits) <= BASE_ATOL
    if (
        ref.case.kw.get("bias", "none") == "none"
    ):  # loading "all"/"lora_only" biases rewrites the base, as PEFT does
        assert maxdiff(off, ref.base_logits) <= BASE_ATOL
    assert torch.equal(logits_of(am, ref.ids), on)  # restored after the block

    model = am.unload()
    assert engine_modules(model) == [] and am.adapters == []
    assert maxdiff(logits_of(model, ref.ids), off) <= BASE_ATOL


def test_load_adapter_into_eval_model_runs_in_eval_mode(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``load_adapter`` on an eval-mode model must not switch lora_dropout on (PEFT's loaders call eval())."""
    torch.manual_seed(SEED)
    pm = get_peft_model(
        load_model(tiny_llama_dir),
        PeftLoraConfig(r=8, lora_dropout=0.5, target_modules=QV, init_lora_weights=False),
    ).eval()
    pm.save_pretrained(tmp_path)
    ids = make_ids(pm.get_base_model())
    expected = logits_of(pm, ids)
    am = AdapterModel(load_model(tiny_llama_dir))  # eval-mode base, no am.eval() call
    am.load_adapter(tmp_path, "x")
    assert not any(m.training for m in am.modules() if isinstance(m, LoraLayer))
    assert maxdiff(logits_of(am, ids), expected) <= ATOL


# ------------------------------------------------------------------------------------ inits
INIT_CASES = [
    ("llama", "gaussian", QV),
    ("gpt2", "gaussian", ["c_attn"]),
    ("llama", "pissa", ["q_proj", "v_proj", "down_proj"]),
    ("gpt2", "pissa", ["c_attn", "c_fc"]),
    ("llama", "olora", ["q_proj", "v_proj", "down_proj"]),
]


def fresh_adapter_pair(
    model_dirs: dict[str, Path], arch: str, kw: dict[str, Any]
) -> tuple[AdapterModel, Any]:
    torch.manual_seed(SEED)
    pm = get_peft_model(load_model(model_dirs[arch]), PeftLoraConfig(**kw)).eval()
    torch.manual_seed(SEED)
    am = AdapterModel(load_model(model_dirs[arch]))
    am.add_adapter("default", LoraConfig(**kw))
    am.eval()
    return am, pm


@pytest.mark.parametrize(("arch", "init", "targets"), INIT_CASES, ids=[f"{a}-{i}" for a, i, _ in INIT_CASES])
def test_init_matches_peft(model_dirs: dict[str, Path], arch: str, init: str, targets: list[str]) -> None:
    """A fresh adapter keeps the model's function; PiSSA/OLoRA: same base rewrite and ΔW as PEFT."""
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": init, "target_modules": targets}
    base = load_model(model_dirs[arch])
    ids = make_ids(base)
    base_logits = logits_of(base, ids)
    am, pm = fresh_adapter_pair(model_dirs, arch, kw)
    assert maxdiff(logits_of(am, ids), base_logits) <= 1e-4
    assert maxdiff(logits_of(pm, ids), base_logits) <= 1e-4
    peft_sd = pm.state_dict()
    layers = [(n, m) for n, m in am.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * len(targets)
    for name, layer in layers:
        prefix = f"base_model.model.{name}"
        a_p, b_p = peft_sd[f"{prefix}.lora_A.default.weight"], peft_sd[f"{prefix}.lora_B.default.weight"]
        a_e, b_e = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        assert a_e.shape == a_p.shape and b_e.shape == b_p.shape
        if init == "gaussian":  # random A ~ N(0, 1/r), B = 0; PEFT draws in a different order
            assert torch.count_nonzero(b_e) == 0
            assert 0.7 / 4 < float(a_e.std()) < 1.3 / 4
            assert torch.equal(layer.base_layer.weight, peft_sd[f"{prefix}.base_layer.weight"])
        else:
            assert maxdiff(b_e @ a_e, b_p @ a_p) <= 1e-5, name
            assert maxdiff(layer.base_layer.weight, peft_sd[f"{prefix}.base_layer.weight"]) <= 1e-6, name
            assert maxdiff(layer.base_layer.weight, dict(base.named_modules())[name].weight) > 1e-3, (
                "PiSSA/OLoRA must move the principal part out of the base weight"
            )


def test_init_olora_conv1d(model_dirs: dict[str, Path]) -> None:
    """OLoRA on GPT-2 Conv1D (PEFT cannot be the oracle there): A = R[:r], B = Q[:, :r] of W (out, in)."""
    base = load_model(model_dirs["gpt2"])
    ids = make_ids(base)
    r, alpha = 4, 16
    am = AdapterModel(load_model(model_dirs["gpt2"]))
    am.add_adapter(
        "o", LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="olora", target_modules=["c_attn"])
    )
    am.eval()
    assert maxdiff(logits_of(am, ids), logits_of(base, ids)) <= 1e-4
    for name, layer in am.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        w = dict(base.named_modules())[name].weight.detach().t()  # Conv1D stores (in, out)
        q, rr = torch.linalg.qr(w)
        a, b = layer.lora_A["o"].detach(), layer.lora_B["o"].detach()
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
        assert maxdiff(a, rr[:r]) <= 1e-5 and maxdiff(b, q[:, :r]) <= 1e-5
        resid = layer.base_layer.weight.detach().t()
        assert maxdiff(resid, w - (alpha / r) * b @ a) <= 1e-6


# ------------------------------------------------------------------------------------ mixed batches
MIXED: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "llama": [
        ("plain8", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
        (
            "rs4",
            {
                "r": 4,
                "lora_alpha": 8,
                "use_rslora": True,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            },
        ),
        ("dora6", {"r": 6, "use_dora": True, "target_modules": ["q_proj", "v_proj", "up_proj"]}),
        ("emb2", {"r": 2, "target_modules": ["embed_tokens", "o_proj"], "modules_to_save": ["lm_head"]}),
        ("bias3", {"r": 3, "lora_bias": True, "target_modules": ["q_proj", "gate_proj"]}),
    ],
    "gpt2": [
        ("plain8", {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}),
        ("bias4", {"r": 4, "lora_bias": True, "target_modules": ["c_attn", "c_fc"]}),
        ("dora6", {"r": 6, "use_dora": True, "target_modules": ["c_attn", "c_proj"]}),
        ("emb2", {"r": 2, "target_modules": ["wte", "c_attn"], "modules_to_save": ["ln_f"]}),
    ],
}
MIXED_ROWS = {
    "llama": ["plain8", BASE_ADAPTER, "dora6", "rs4", "plain8", "emb2", "bias3"],
    "gpt2": ["dora6", "plain8", BASE_ADAPTER, "bias4", "emb2", "dora6"],
}


@dataclass
class MixedRun:
    am: AdapterModel
    ids: torch.Tensor
    rows: list[str]
    per_adapter: dict[str, torch.Tensor]  # whole batch under set_adapter(name); BASE_ADAPTER: base model
    save_root: Path

    def expected(self) -> torch.Tensor:
        return torch.stack([self.per_adapter[n][i] for i, n in enumerate(self.rows)])


def per_adapter_logits(am: AdapterModel, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        am.set_adapter(n)
        out[n] = logits_of(am, ids)
    with am.disable_adapters():
        out[BASE_ADAPTER] = logits_of(am, ids)
    return out


@pytest.fixture(scope="module", params=sorted(MIXED))
def mixed(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> MixedRun:
    arch = request.param
    am = AdapterModel(load_model(model_dirs[arch]))
    for i, (name, kw) in enumerate(MIXED[arch]):
        torch.manual_seed(SEED + i)
        am.add_adapter(name, LoraConfig(init_lora_weights=False, **kw))
        am.set_adapter(name)
        perturb_trainable(am, seed=SEED + i)
    am.eval()
    ids = make_ids(am.model, batch=len(MIXED_ROWS[arch]), seq=6)
    names = [n for n, _ in MIXED[arch]]
    per = per_adapter_logits(am, ids, names)
    assert maxdiff(per[BASE_ADAPTER], logits_of(load_model(model_dirs[arch]), ids)) <= BASE_ATOL
    for n in names:
        assert maxdiff(per[n], per[BASE_ADAPTER]) > MIN_EFFECT, n
    root = tmp_path_factory.mktemp(f"mixed-{arch}")
    for n in names:
        am.save_adapter(root / n, n)
    return MixedRun(am, ids, MIXED_ROWS[arch], per, root)


def test_mixed_batch_bank_path_matches_rows_alone(mixed: MixedRun) -> None:
    am = mixed.am
    am.set_adapter(mixed.rows[0])
    with torch.no_grad():
        got = am(input_ids=mixed.ids, adapter_names=mixed.rows).logits
    assert maxdiff(got, mixed.expected()) <= ATOL
    base_rows = [i for i, n in enumerate(mixed.rows) if n == BASE_ADAPTER]
    assert maxdiff(got[base_rows], mixed.per_adapter[BASE_ADAPTER][base_rows]) <= BASE_ATOL


def test_mixed_batch_grouped_path_with_grad_matches_bank_path(mixed: MixedRun) -> None:
    am = mixed.am
    names = [n for n in mixed.per_adapter if n != BASE_ADAPTER]
    am.set_adapter(names)  # every (trainable) adapter active → all require grad → grouped path
    try:
        with torch.no_grad():
            bank = am(input_ids=mixed.ids, adapter_names=mixed.rows).logits
        out = am(input_ids=mixed.ids, adapter_names=mixed.rows).logits
        assert out.requires_grad
        assert maxdiff(out.detach(), mixed.expected()) <= ATOL
        assert maxdiff(out.detach(), bank) <= ATOL
        out.float().pow(2).mean().backward()
        used = set(mixed.rows)
        named = dict(am.named_parameters())
        for n in names:
            grads = [p.grad for key, p in named.items() if f".{n}" in key and p.requires_grad]
            assert grads, n
            if n in used:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reached {n}"
    finally:
        am.zero_grad(set_to_none=True)
        am.set_adapter(names[0])


def test_mixed_batch_sees_in_place_weight_updates(mixed: MixedRun) -> None:
    """An optimizer step changes trainable tensors in place: the stacked bank must not serve stale weights."""
    am = mixed.am
    name = "plain8"
    am.set_adapter(name)
    params = am.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    rows = [name, BASE_ADAPTER, *mixed.rows[2:]]
    mine = [i for i, n in enumerate(rows) if n == name]
    others = [i for i, n in enumerate(rows) if n != name]
    try:
        with torch.no_grad():
            before = am(input_ids=mixed.ids, adapter_names=rows).logits
            for p in params:
                p.mul_(1.5)
            after = am(input_ids=mixed.ids, adapter_names=rows).logits
            alone = logits_of(am, mixed.ids)
        assert maxdiff(after[mine], before[mine]) > MIN_EFFECT
        assert maxdiff(after[mine], alone[mine]) <= ATOL
        assert maxdiff(after[others], before[others]) <= ATOL
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def test_mixed_batch_with_loaded_adapters(mixed: MixedRun, model_dirs: dict[str, Path]) -> None:
    """Frozen (loaded) adapters in a fresh model: same rows as the trainable model that wrote them."""
    arch = "llama" if "bias3" in mixed.per_adapter else "gpt2"
    am = AdapterModel(load_model(model_dirs[arch]))
    for n in (n for n in mixed.per_adapter if n != BASE_ADAPTER):
        am.load_adapter(mixed.save_root / n, n)
    am.eval()
    got = logits_of(am, mixed.ids, adapter_names=mixed.rows)
    assert maxdiff(got, mixed.expected()) <= ATOL
    # rows in another order, adapters repeated, base only
    rows = list(reversed(mixed.rows))
    exp = torch.stack([mixed.per_adapter[n][len(rows) - 1 - i] for i, n in enumerate(rows)])
    got = logits_of(am, mixed.ids.flip(0), adapter_names=rows)
    assert maxdiff(got, exp) <= ATOL
    only_base = [BASE_ADAPTER] * len(rows)
    assert (
        maxdiff(logits_of(am, mixed.ids, adapter_names=only_base), mixed.per_adapter[BASE_ADAPTER])
        <= BASE_ATOL
    )


def test_mixed_batch_matches_peft(mixed: MixedRun, model_dirs: dict[str, Path]) -> None:
    """The same files in PEFT give the same rows (Llama only).

    PEFT 0.21.2 cannot be the oracle for every row: it refuses DoRA in mixed batches, has no mixed-batch
    path for Conv1D (GPT-2), and raises KeyError when an adapter without a ``modules_to_save`` copy shares
    the batch with one that has it. Those rows run as base rows here (the other tests cover them).
    """
    if "bias3" not in mixed.per_adapter:
        pytest.skip("PEFT has no mixed-batch forward for Conv1D layers")
    skip = {"dora6", "emb2"}
    names = [n for n in mixed.per_adapter if n != BASE_ADAPTER and n not in skip]
    pm = PeftModel.from_pretrained(
        load_model(model_dirs["llama"]), mixed.save_root / names[0], adapter_name=names[0]
    )
    for n in names[1:]:
        pm.load_adapter(mixed.save_root / n, adapter_name=n)
    pm.eval()
    rows = [BASE_ADAPTER if n in skip else n for n in mixed.rows]
    theirs = logits_of(pm, mixed.ids, adapter_names=rows)
    ours = logits_of(mixed.am, mixed.ids, adapter_names=rows)
    assert maxdiff(ours, theirs) <= ATOL
    for n in names:
        pm.set_adapter(n)
        assert maxdiff(logits_of(pm, mixed.ids), mixed.per_adapter[n]) <= ATOL


def test_mixed_batch_generate(mixed: MixedRun) -> None:
    am = mixed.am
    ids = mixed.ids[:3, :4]
    rows = mixed.rows[:3]
    out = am.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=rows,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    for i, n in enumerate(rows):
        if n == BASE_ADAPTER:
            with am.disable_adapters():
                alone = am.generate(
                    input_ids=ids[i : i + 1],
                    attention_mask=torch.ones_like(ids[i : i + 1]),
                    max_new_tokens=3,
                    do_sample=False,
                    pad_token_id=0,
                )
        else:
            am.set_adapter(n)
            alone = am.generate(
                input_ids=ids[i : i + 1],
                attention_mask=torch.ones_like(ids[i : i + 1]),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
        assert torch.equal(out[i], alone[0]), n


# ------------------------------------------------------------------------------------ several adapters
SEVERAL = [
    ("a", {"r": 8, "target_modules": QV}),
    ("b", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "o_proj"]}),
    ("c", {"r": 2, "target_modules": ["v_proj", "down_proj"], "modules_to_save": ["lm_head"]}),
]


@pytest.fixture(scope="module")
def several_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters a, b, c written by PEFT."""
    out = {}
    for i, (name, kw) in enumerate(SEVERAL):
        torch.manual_seed(SEED + i)
        pm = get_peft_model(load_model(tiny_llama_dir), PeftLoraConfig(init_lora_weights=False, **kw))
        perturb_trainable(pm, seed=SEED + i)
        out[name] = tmp_path_factory.mktemp(f"several-{name}")
        pm.save_pretrained(out[name])
    return out


def several_model(tiny_llama_dir: Path, dirs: dict[str, Path]) -> AdapterModel:
    am = AdapterModel(load_model(tiny_llama_dir))
    for name, _ in SEVERAL:
        am.load_adapter(dirs[name], name)
    am.eval()
    return am


def test_several_adapters_switch_and_delete(tiny_llama_dir: Path, several_dirs: dict[str, Path]) -> None:
    am = several_model(tiny_llama_dir, several_dirs)
    ids = make_ids(am.model)
    assert am.adapters == ["a", "b", "c"] and am.active_adapter == "a"
    alone = {}
    for name, _ in SEVERAL:
        single = AdapterModel(load_model(tiny_llama_dir))
        single.load_adapter(several_dirs[name], name)
        single.eval()
        alone[name] = logits_of(single, ids)
    with torch.no_grad():
        base = logits_of(load_model(tiny_llama_dir), ids)
    for name in ["c", "a", "b", "a"]:
        am.set_adapter(name)
        assert am.active_adapter == name
        assert maxdiff(logits_of(am, ids), alone[name]) <= ATOL
        assert maxdiff(alone[name], base) > MIN_EFFECT
    for x, y in [("a", "b"), ("a", "c"), ("b", "c")]:
        assert maxdiff(alone[x], alone[y]) > MIN_EFFECT

    am.set_adapter("b")
    am.delete_adapter("b")
    assert am.adapters == ["a", "c"]
    assert am.active_adapter in ("a", "c")
    for name in ("a", "c"):
        am.set_adapter(name)
        assert maxdiff(logits_of(am, ids), alone[name]) <= ATOL
    assert (
        maxdiff(
            logits_of(am, ids, adapter_names=["a", "c", BASE_ADAPTER]),
            torch.stack([alone["a"][0], alone["c"][1], base[2]]),
        )
        <= ATOL
    )
    assert not any("b" in layer.specs for layer in am.model.modules() if isinstance(layer, LoraLayer))
    with pytest.raises(AdapterNotFoundError, match="'b'"):
        am.set_adapter("b")
    with pytest.raises(AdapterNotFoundError):
        am.delete_adapter("b")
    with pytest.raises(AdapterNotFoundError):
        am.save_adapter(Path("/nonexistent"), "b")
    with pytest.raises(AdapterNotFoundError):
        logits_of(am, ids, adapter_names=["a", "b", "c"])
    with pytest.raises(AdapterNotFoundError):
        am.merge_adapter(["b"])
    # the freed name can be used again
    am.load_adapter(several_dirs["b"], "b")
    am.set_adapter("b")
    assert maxdiff(logits_of(am, ids), alone["b"]) <= ATOL


def test_merge_several_adapters_then_unmerge(tiny_llama_dir: Path, several_dirs: dict[str, Path]) -> None:
    am = several_model(tiny_llama_dir, several_dirs)
    ids = make_ids(am.model)
    am.set_adapter(["a", "b"])
    both = logits_of(am, ids)
    am.merge_adapter()
    assert sorted(am.merged_adapters) == ["a", "b"]
    assert maxdiff(logits_of(am, ids), both) <= MERGE_ATOL
    am.unmerge_adapter()
    assert maxdiff(logits_of(am, ids), both) <= MERGE_ATOL
    pm = PeftModel.from_pretrained(load_model(tiny_llama_dir), several_dirs["a"], adapter_name="a")
    pm.load_adapter(several_dirs["b"], adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    pm.eval()
    assert maxdiff(logits_of(pm, ids), both) <= ATOL


def test_save_pretrained_multi_adapter_layout_loads_in_peft(
    tiny_llama_dir: Path, several_dirs: dict[str, Path], tmp_path: Path
) -> None:
    am = AdapterModel(load_model(tiny_llama_dir))
    am.load_adapter(several_dirs["a"], "default")
    am.load_adapter(several_dirs["b"], "other")
    am.eval()
    ids = make_ids(am.model)
    ours = {}
    for n in ("default", "other"):
        am.set_adapter(n)
        ours[n] = logits_of(am, ids)
    am.save_pretrained(tmp_path / "engine")

    pm = PeftModel.from_pretrained(load_model(tiny_llama_dir), several_dirs["a"])
    pm.load_adapter(several_dirs["b"], adapter_name="other")
    pm.save_pretrained(tmp_path / "peft")

    assert (
        weight_layout(tmp_path / "engine")
        == weight_layout(tmp_path / "peft")
        == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "other/adapter_config.json",
            "other/adapter_model.safetensors",
        ]
    )
    for sub in ("", "other"):
        assert saved_tensors(tmp_path / "engine" / sub) == saved_tensors(tmp_path / "peft" / sub)

    loaded = PeftModel.from_pretrained(load_model(tiny_llama_dir), tmp_path / "engine")
    loaded.load_adapter(tmp_path / "engine" / "other", adapter_name="other")
    loaded.eval()
    assert maxdiff(logits_of(loaded, ids), ours["default"]) <= ATOL
    loaded.set_adapter("other")
    assert maxdiff(logits_of(loaded, ids), ours["other"]) <= ATOL


def weight_layout(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md")


def test_save_pretrained_readme_only_at_root(
    tiny_llama_dir: Path, several_dirs: dict[str, Path], tmp_path: Path
) -> None:
    am = AdapterModel(load_model(tiny_llama_dir))
    am.load_adapter(several_dirs["a"], "default")
    am.load_adapter(several_dirs["b"], "other")
    am.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").exists()
    assert not (tmp_path / "other" / "README.md").exists()


def test_save_pretrained_selected_adapters(
    tiny_llama_dir: Path, several_dirs: dict[str, Path], tmp_path: Path
) -> None:
    am = several_model(tiny_llama_dir, several_dirs)
    am.save_pretrained(tmp_path, selected_adapters=["c"])
    assert (tmp_path / "c" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------ training smoke
TRAIN_CASES = [
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": QV}),
    (
        "llama",
        {
            "r": 4,
            "use_dora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    ("gpt2", {"r": 4, "target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.1}),
]


@pytest.mark.parametrize(
    ("arch", "kw"), TRAIN_CASES, ids=["llama-lora", "llama-dora-mts", "gpt2-lora-dropout"]
)
def test_training_smoke(model_dirs: dict[str, Path], arch: str, kw: dict[str, Any]) -> None:
    model = load_model(model_dirs[arch])
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    am = AdapterModel(model)
    torch.manual_seed(SEED)
    am.add_adapter("t", LoraConfig(**kw))
    am.train()
    params = am.trainable_parameters()
    names = {id(p): n for n, p in am.named_parameters()}
    assert params
    for p in params:
        n = names[id(p)]
        assert ".lora_" in n or ".modules_to_save.t." in n, f"non-adapter tensor is trainable: {n}"
    assert all(
        not p.requires_grad
        for n, p in am.named_parameters()
        if ".lora_" not in n and ".modules_to_save." not in n
    )
    trainable, total = am.num_trainable_parameters()
    assert 0 < trainable < total
    ids = make_ids(am.model, batch=4, seq=10)
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    am.eval()
    with torch.no_grad():
        final = float(am(input_ids=ids, labels=ids).loss)
    assert final < losses[0] - 0.05, losses
    after = am.unload().state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed during training"
