"""``SlottedModel`` (serving slots) against HF PEFT: every LoRA variant PEFT can save, one slot per row.

Each case of the LoRA conformance table (base-modifying inits aside) is created with PEFT, perturbed
so it is never the identity, saved, prepared from its files and copied into a slot. A batch routed
to that slot must give PEFT's logits; batches mixing cases, ranks, DoRA, biases, ``modules_to_save``
and base rows must give, row by row, what each row gives alone; and a slot that is cleared or
reloaded with another adapter must forget the old one on every layer.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft", reason="peft is the test oracle")

from peft import get_peft_model
from safetensors.torch import load_file, save_file

from adapters_core import (
    AdapterMismatchError,
    ConfigError,
    NonFiniteWeightsError,
    RankTooLargeError,
    TargetModulesNotFoundError,
)
from adapters_core.peft_format import read_adapter
from adapters_core.serving import SlottedModel
from adapters_core.serving import prepare as prepare_module
from adapters_core.serving.cpu_bgmv import BankCall, load_bgmv
from adapters_core.serving.gpu_bgmv import GpuBgmv, KernelUnavailable, load_gpu_bgmv_or_raise
from adapters_core.serving.layers import SlotLoraLayer
from adapters_core.serving.prepare import held_bytes
from tests.conftest import load_model
from tests.core.test_lora_conformance import (
    CASES,
    MIN_EFFECT,
    QV,
    SEED,
    Case,
    logits_of,
    make_ids,
    maxdiff,
    peft_config,
    perturb_trainable,
)

SERVABLE = [c for c in CASES if not c.modifies_base]
ATOL = 2e-5
# how a batch of rows on different adapters runs its LoRA products: the compiled CPU kernel reading the
# slot bank by slot id (where it can be built here), torch, gathering from the bank or (decode steps)
# reading per-row buffers written when rows join, or (decode steps) the fused GPU kernel, run here by
# Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
PATHS = {"kernel": {"cpu_kernels": True, "row_capacity": 8},
         "torch-bank": {"cpu_kernels": False, "row_capacity": 0},
         "torch-row-buffers": {"cpu_kernels": False, "row_capacity": 8},
         "triton": {"cpu_kernels": False, "row_capacity": 0, "gpu_kernels": True}}


def _triton_reason() -> str | None:
    try:
        return None if load_gpu_bgmv_or_raise().interpret else "Triton does not run in its interpreter here"
    except KernelUnavailable as exc:
        return str(exc)


TRITON_MISSING = _triton_reason()
PATH_IDS = [*(p for p in PATHS if p != "triton"),
            pytest.param("triton", marks=pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING)))]


def count_step_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rank width of every launch of the fused GPU kernel from now on."""
    widths: list[int] = []
    step = GpuBgmv.step

    def recording_step(self: GpuBgmv, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       width: int, out: torch.Tensor) -> torch.Tensor:
        widths.append(width)
        return step(self, x, a, b, slots, width, out)

    monkeypatch.setattr(GpuBgmv, "step", recording_step)
    return widths


@dataclass
class Saved:
    case: Case
    path: Path
    ids: torch.Tensor
    logits: torch.Tensor  # PEFT's, adapter active
    base_logits: torch.Tensor


def _save(case: Case, base_dir: Path, out: Path, seed: int = SEED) -> Saved:
    torch.manual_seed(seed)
    pm = get_peft_model(load_model(base_dir), peft_config(case))
    perturb_trainable(pm, seed)
    pm.eval()
    ids = make_ids(pm.get_base_model(), batch=4)
    pm.save_pretrained(out)
    logits = logits_of(pm, ids)
    base = logits_of(load_model(base_dir), ids)  # PEFT's disable_adapter keeps trained biases (bias="all")
    return Saved(case, out, ids, logits, base)


@pytest.fixture(scope="module")
def saved(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    return {c.id: _save(c, model_dirs[c.arch], tmp_path_factory.mktemp(c.id)) for c in SERVABLE}


def slotted(base_dir: Path, num_slots: int = 4, max_rank: int = 64) -> SlottedModel:
    return SlottedModel(load_model(base_dir), num_slots, max_rank=max_rank)


def load_into(sm: SlottedModel, slot: int, path: Path) -> None:
    config, tensors = read_adapter(path)
    sm.load(slot, sm.prepare(config, tensors))


def routed_logits(sm: SlottedModel, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
    with torch.inference_mode(), sm.route(slots):
        return sm.model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", SERVABLE, ids=lambda c: c.id)
def test_slot_gives_peft_logits(case: Case, saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    s = saved[case.id]
    sm = slotted(model_dirs[case.arch])
    config, tensors = read_adapter(s.path)
    low = min(t.data_ptr() for t in tensors.values())
    high = max(t.data_ptr() + t.nbytes for t in tensors.values())
    assert high - low == sum(t.nbytes for t in tensors.values())  # the file's tensors are views of one buffer ...
    prepared = sm.prepare(config, tensors)
    held = [t for w in prepared.layers.values() for t in w.tensors()] + list(prepared.biases.values())
    held += [t for state in prepared.swaps.values() for t in state.values()]
    assert not [t for t in held if low <= t.data_ptr() < high]  # ... which the host tier must not keep
    sm.load(2, prepared)
    assert maxdiff(s.logits, s.base_logits) > MIN_EFFECT
    got = routed_logits(sm, s.ids, [2] * len(s.ids))
    assert maxdiff(got, s.logits) <= ATOL
    assert maxdiff(routed_logits(sm, s.ids, [0] * len(s.ids)), s.base_logits) <= ATOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_rows_equal_each_row_alone(arch: str, saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    cases = [c for c in SERVABLE if c.arch == arch]
    sm = slotted(model_dirs[arch], num_slots=len(cases))
    for slot, case in enumerate(cases, start=1):
        load_into(sm, slot, saved[case.id].path)
    ids = saved[cases[0].id].ids[:1].repeat(len(cases) + 2, 1)
    rows = [0, *range(1, len(cases) + 1), 0]
    rows[-1] = 1  # two rows on one slot
    mixed = routed_logits(sm, ids, rows)
    for i, slot in enumerate(rows):
        alone = routed_logits(sm, ids[i:i + 1], [slot])
        assert maxdiff(mixed[i:i + 1], alone) <= ATOL, (i, slot)
    # every adapter row differs from the base row: nothing silently served the base model
    for i, slot in enumerate(rows):
        if slot:
            assert maxdiff(mixed[i], mixed[0]) > MIN_EFFECT, cases[slot - 1].id


@pytest.mark.parametrize("weights", ["float32", "float16"])
@pytest.mark.parametrize("path", PATH_IDS)
def test_decode_step_rows_use_their_own_slot(path: str, weights: str, saved: dict[str, Saved],
                                             model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One token per row (the decode path) with a cache: mixed rows equal rows alone, whether the step
    reads the slot bank (the CPU kernel, torch, or the fused GPU kernel) or per-row buffers (which must
    follow rows that change slot, and reloaded slots), with the slots' weights in float32 or float16 (the
    row buffers then hold them widened; the GPU kernel widens them as it loads)."""
    from transformers import DynamicCache

    launches = count_step_kernel_calls(monkeypatch)

    names = ["llama-r8-qv", "llama-all-linear", "llama-dora", "llama-embed_tokens", "llama-rank-alpha-pattern"]
    sm = SlottedModel(load_model(model_dirs["llama"]), len(names), weight_dtype=getattr(torch, weights),
                      **PATHS[path])  # type: ignore[arg-type]
    kernel = path == "kernel" and load_bgmv() is not None
    row_buffers = path == "torch-row-buffers" or (path == "kernel" and not kernel)
    assert sm.row_capacity == (8 if row_buffers else 0)  # the kernel needs no row buffers
    for slot, name in enumerate(names[:4], start=1):
        load_into(sm, slot, saved[name].path)
    ids = saved[names[0]].ids[:1].repeat(6, 1)

    def two_steps(batch_ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(slots):
                out = sm.model(input_ids=batch_ids, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            sm.sync_rows(slots)
            with sm.route(slots):
                routing = sm.routing.current
                assert routing is None if not any(slots) else routing is not None and routing.rows_synced == row_buffers
                return sm.model(input_ids=nxt, cache=cache, use_cache=True).logits.float()

    def check(rows: list[int]) -> None:
        mixed = two_steps(ids[: len(rows)], rows)
        for i, slot in enumerate(rows):
            sm.sync_rows([slot])
            assert maxdiff(mixed[i:i + 1], two_steps(ids[i:i + 1], [slot])) <= ATOL, (rows, i)

    check([1, 2, 0, 4, 2, 1])
    check([1, 4, 0, 4, 1, 1])  # rows 1 and 4 changed slot (apart: the row buffers' scattered copy)
    check([2, 1, 0, 4, 2, 1])  # rows changed slot
    load_into(sm, 2, saved[names[4]].path)  # slot 2 reloaded with another adapter (other ranks)
    check([1, 2, 0, 4, 2, 3])
    assert bool(launches) == (path == "triton")  # the GPU kernel ran the mixed decode steps, and only there
    if path == "triton":  # rows all on one adapter decode through it too
        before = len(launches)
        two_steps(ids[:3], [2, 2, 2])
        assert len(launches) > before


def test_reload_and_clear_forget_the_old_adapter(saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    wide, narrow = saved["llama-all-linear"], saved["llama-r8-qv"]
    sm = slotted(model_dirs["llama"], num_slots=1)
    load_into(sm, 1, wide.path)
    load_into(sm, 1, narrow.path)  # targets fewer layers: the others must be zeroed
    assert maxdiff(routed_logits(sm, narrow.ids, [1] * 4), narrow.logits) <= ATOL
    sm.clear(1)
    assert maxdiff(routed_logits(sm, narrow.ids, [1] * 4), narrow.base_logits) <= ATOL


LM_HEAD_LORA = Case("llama-lm_head-lora", "llama", {"r": 4, "target_modules": ["q_proj", "lm_head"]})


@pytest.mark.parametrize(("first", "second"), [
    ("gpt2-bias-all", "gpt2-all-linear"),  # trained biases (on c_fc, ...), then LoRA on those modules
    ("gpt2-all-linear", "gpt2-bias-all"),  # LoRA on c_fc, then only a trained bias there
    ("llama-modules-to-save", LM_HEAD_LORA.id),  # a full copy of lm_head, then LoRA on lm_head
    (LM_HEAD_LORA.id, "llama-modules-to-save"),
])
def test_a_reused_slot_serves_only_the_new_adapter_whatever_the_old_one_put_on_its_modules(
        first: str, second: str, saved: dict[str, Saved], model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """One module can carry LoRA for one adapter and a trained bias or a full copy for another: loading the
    second into the first's slot must clear the first's part, and either may come first in the process."""
    extra = {LM_HEAD_LORA.id: _save(LM_HEAD_LORA, model_dirs["llama"], tmp_path / "lm_head")}
    old, new = (saved.get(i) or extra[i] for i in (first, second))
    sm = slotted(model_dirs[new.case.arch], num_slots=2)
    load_into(sm, 1, old.path)
    load_into(sm, 1, new.path)
    load_into(sm, 2, old.path)
    assert maxdiff(new.logits, new.base_logits) > MIN_EFFECT
    assert maxdiff(routed_logits(sm, new.ids, [1] * len(new.ids)), new.logits) <= ATOL
    mixed = routed_logits(sm, new.ids, [1, 2, 1, 2])  # (the two cases of an arch share their inputs)
    assert maxdiff(mixed[0::2], new.logits[0::2]) <= ATOL and maxdiff(mixed[1::2], old.logits[1::2]) <= ATOL


def test_modules_to_save_with_trained_biases_is_served_as_peft_serves_it(model_dirs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """``bias="all"`` also saves the biases inside PEFT's copy wrapper (``ln_f.modules_to_save.bias``, a second
    record of ``ln_f.bias``, and ``ln_f.original_module.bias``); a file whose two records disagree is refused."""
    case = Case("gpt2-modules-to-save-bias-all", "gpt2",
                {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"], "bias": "all"})
    s = _save(case, model_dirs["gpt2"], tmp_path / "saved")
    sm = slotted(model_dirs["gpt2"], num_slots=1)
    load_into(sm, 1, s.path)
    assert maxdiff(s.logits, s.base_logits) > MIN_EFFECT
    assert maxdiff(routed_logits(sm, s.ids, [1, 0, 1, 0]), torch.stack([s.logits[0], s.base_logits[1], s.logits[2],
                                                                       s.base_logits[3]])) <= ATOL
    weights = tmp_path / "saved" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.transformer.ln_f.modules_to_save.bias"
    save_file({**tensors, key: tensors[key] + 1}, weights)
    config, tensors = read_adapter(tmp_path / "saved")
    with pytest.raises(AdapterMismatchError, match=r"two values for the saved copy of transformer\.ln_f"):
        sm.prepare(config, tensors)


def test_modules_to_save_naming_a_block_is_refused_whatever_was_served_before(
        saved: dict[str, Saved], model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An adapter registered before uploads refused it: ``mlp`` (whose layers another adapter's LoRA wraps) is
    refused naming modules_to_save, leaving the model as it was; the adapter served before still serves."""
    sm = slotted(model_dirs["llama"], num_slots=2)
    first = saved["llama-all-linear"]
    load_into(sm, 1, first.path)
    before = routed_logits(sm, first.ids, [1, 0, 1, 0])
    block = _save(Case("llama-mlp-copy", "llama", {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["mlp"]}),
                  model_dirs["llama"], tmp_path / "block")
    with pytest.raises(ConfigError, match="mlp") as info:
        sm.prepare(*read_adapter(block.path))
    assert info.value.field == "modules_to_save"
    assert torch.equal(routed_logits(sm, first.ids, [1, 0, 1, 0]), before)


def test_preparing_an_adapter_on_another_thread_wraps_modules_only_while_nobody_walks_them(
        saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    """Serving prepares adapters on request threads (on GPUs) while its engine thread runs forwards and loads,
    which walk the wrapped modules: a new target spec's wrapping waits until the walker lets go."""
    first, new = saved["llama-r8-qv"], saved["llama-all-linear"]
    sm = slotted(model_dirs["llama"], num_slots=2)
    load_into(sm, 1, first.path)
    wrapped = {n for n, m in sm.model.named_modules() if isinstance(m, SlotLoraLayer)}
    result: list[Any] = []
    with sm.structure_lock:  # the engine, mid-step
        worker = threading.Thread(target=lambda: result.append(sm.prepare(*read_adapter(new.path))))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not result
        assert {n for n, m in sm.model.named_modules() if isinstance(m, SlotLoraLayer)} == wrapped
        assert maxdiff(routed_logits(sm, first.ids, [1] * len(first.ids)), first.logits) <= ATOL
    worker.join(timeout=60)
    sm.load(2, result[0])
    assert maxdiff(routed_logits(sm, new.ids, [2] * len(new.ids)), new.logits) <= ATOL
    assert maxdiff(routed_logits(sm, first.ids, [1] * len(first.ids)), first.logits) <= ATOL


def test_preparing_an_adapter_whose_modules_are_wrapped_does_not_wait_for_the_walker(
        saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    s = saved["llama-modules-to-save"]
    sm = slotted(model_dirs["llama"], num_slots=1)
    load_into(sm, 1, s.path)
    result: list[Any] = []
    with sm.structure_lock:  # the engine, mid-step: nothing new to wrap, so nothing to wait for
        worker = threading.Thread(target=lambda: result.append(sm.prepare(*read_adapter(s.path))))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive() and len(result) == 1


def test_host_bytes_count_pinned_tensors_as_the_pinned_allocator_holds_them(
        saved: dict[str, Saved], model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    models = {arch: slotted(path) for arch, path in model_dirs.items()}
    prepared = [models[s.case.arch].prepare(*read_adapter(s.path)) for s in saved.values()]
    sizes = [[t.nbytes for w in p.layers.values() for t in w.tensors()]
             + [t.nbytes for state in p.swaps.values() for t in state.values()]
             + [t.nbytes for t in p.biases.values()] for p in prepared]
    assert [p.nbytes for p in prepared] == [sum(n) for n in sizes]  # pageable (no CUDA here): their own bytes
    monkeypatch.setattr(prepare_module, "_is_pinned", lambda tensor: True)
    rounded = [sum(1 << (b - 1).bit_length() for b in n) for n in sizes]
    assert [p.nbytes for p in prepared] == rounded
    assert any(r > sum(n) for r, n in zip(rounded, sizes, strict=True))  # some shape here is not a power of two
    assert held_bytes(2816 * 16 * 2, pinned=True) == 128 * 1024  # a GPU bench weight: 88 KiB holds 128
    assert held_bytes(2816 * 16 * 2, pinned=False) == 2816 * 16 * 2
    assert held_bytes(32 * 1024, pinned=True) == 32 * 1024


def test_rank_above_the_limit_is_refused(saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    sm = slotted(model_dirs["llama"], max_rank=4)
    config, tensors = read_adapter(saved["llama-r8-qv"].path)
    with pytest.raises(RankTooLargeError, match="rank 8") as info:
        sm.prepare(config, tensors)
    assert info.value.rank == 8 and info.value.limit == 4


def test_adapter_for_another_base_model_is_refused(saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    config, tensors = read_adapter(saved["llama-r8-qv"].path)
    sm = slotted(model_dirs["gpt2"])
    with pytest.raises(TargetModulesNotFoundError):
        sm.prepare(config, tensors)
    wrong = {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in tensors.items()}
    with pytest.raises(AdapterMismatchError, match="shape mismatch"):
        slotted(model_dirs["llama"]).prepare(config, wrong)
    extra = {**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, 32)}
    with pytest.raises(AdapterMismatchError, match="unexpected key"):
        slotted(model_dirs["llama"]).prepare(config, extra)


def test_base_rows_are_exactly_the_base_model(saved: dict[str, Saved], model_dirs: dict[str, Path]) -> None:
    base = load_model(model_dirs["llama"])
    sm = SlottedModel(copy.deepcopy(base), 2)
    load_into(sm, 1, saved["llama-all-linear"].path)
    ids = make_ids(base)
    assert maxdiff(routed_logits(sm, ids, [0, 0, 0]), logits_of(base, ids)) == 0
    with pytest.raises(ConfigError, match="slot ids"), sm.route([0, 3]):
        pass


@pytest.mark.parametrize("path", ["torch-bank", "torch-row-buffers", PATH_IDS[-1]])
def test_bfloat16_model_serves_adapters_as_accurately_as_peft(path: str, saved: dict[str, Saved],
                                                              model_dirs: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU servers run bfloat16 checkpoints: slots (bf16 banks) in a mixed batch, prefill and a decode step
    (on the bank, on row buffers, or through the fused GPU kernel), stay as close to the float32 answer as
    PEFT's own bfloat16 model does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    names = ["llama-all-linear", "llama-rslora", "llama-r8-qv", "llama-rank-alpha-pattern"]  # (peft: no DoRA in mixed batches)
    ids = saved[names[0]].ids
    assert all(torch.equal(saved[n].ids, ids) for n in names)

    def bf16_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16).eval()

    def two_steps(model: torch.nn.Module, call: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the prompt's last position and of one decode step on a cache (fed the same token)."""
        with torch.inference_mode():
            cache = DynamicCache()
            first = call(model, ids, cache).logits[:, -1].float()  # type: ignore[operator]
            step = call(model, torch.full((len(ids), 1), 7), cache).logits[:, -1].float()  # type: ignore[operator]
        return first, step

    launches = count_step_kernel_calls(monkeypatch)
    sm = SlottedModel(bf16_base(), len(names), **PATHS[path])  # type: ignore[arg-type]
    for slot, name in enumerate(names, start=1):
        load_into(sm, slot, saved[name].path)
    slots = [1, 2, 3, 4]

    def ours(model: torch.nn.Module, x: torch.Tensor, cache: DynamicCache) -> object:
        if x.shape[1] == 1:
            sm.sync_rows(slots)
        with sm.route(slots):
            return model(input_ids=x, cache=cache, use_cache=True)

    def peft_call(model: torch.nn.Module, x: torch.Tensor, cache: DynamicCache) -> object:
        return model(input_ids=x, cache=cache, use_cache=True, adapter_names=names)

    def peft_model(dtype: torch.dtype) -> torch.nn.Module:
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=dtype).eval(),
                                       saved[names[0]].path, adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(saved[name].path, adapter_name=name)
        return pm.eval()

    truth = two_steps(peft_model(torch.float32), peft_call)
    peft_bf16 = two_steps(peft_model(torch.bfloat16), peft_call)
    got = two_steps(sm.model, ours)
    assert maxdiff(truth[0][0], saved[names[0]].logits[0, -1]) <= ATOL  # the float32 reference is PEFT's
    for position in range(2):
        # bfloat16 rounding error, ours against PEFT's: the mean over every logit (about 6e-4 for PEFT here)
        # is a stable statistic; the largest single error (2e-3 to 4e-3) depends on which logit rounds
        # worst, and on the CPU's bfloat16 matmul kernels, so it gets more room
        peft_mean = (peft_bf16[position] - truth[position]).abs().mean().item()
        peft_max = maxdiff(peft_bf16[position], truth[position])
        assert 0 < peft_mean < peft_max < 0.1
        ours_mean = (got[position] - truth[position]).abs().mean().item()
        assert ours_mean <= 1.5 * peft_mean, (position, ours_mean, peft_mean)
        assert maxdiff(got[position], truth[position]) <= 2.5 * peft_max, (position, peft_max)
        for i in range(1, len(names)):  # each row's own adapter: rows differ from one another
            assert maxdiff(got[position][i], got[position][0]) > MIN_EFFECT
    assert bool(launches) == (path == "triton")


@pytest.mark.parametrize("path", PATH_IDS)
def test_a_higher_rank_adapter_in_another_slot_costs_other_rows_nothing(
        path: str, saved: dict[str, Saved], model_dirs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Slot buffers are padded to the largest rank ever loaded, but a batch multiplies only as many rank
    columns as its own slots' largest rank: after an r=16 adapter lands in another slot (and after it
    leaves), the r<=8 rows give the same answers with products of width 8, not 16. Rows of the r=16
    adapter, mixed with the others, still give what they give alone; through the compiled kernel, the
    other rows of that mixed batch multiply only their own adapter's rank (4 or 8), and rows whose
    adapter leaves a layer alone multiply nothing there."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache

    class LoraWidths(TorchDispatchMode):
        """Rank width of every LoRA product: shrink ``bmm(x, A)`` and expand ``baddbmm(out, h, B)``, and
        the compiled CPU kernel's calls (where it is built)."""

        active: LoraWidths | None = None

        def __init__(self) -> None:
            super().__init__()
            self.widths: set[int] = set()
            self.row_widths: set[int] = set()  # the kernel's, per row: min(call width, the slot's rank)
            self.shrinks: set[tuple[int, int]] = set()  # (rows, width) of each bmm(x, A), and mm(x[i], A[i])
            self.kernel_calls = 0

        def __enter__(self) -> LoraWidths:
            LoraWidths.active = self
            return super().__enter__()  # type: ignore[no-any-return]

        def __exit__(self, *exc: object) -> None:
            LoraWidths.active = None
            super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.bmm.default and args[1].shape[-2] > 1:  # (rotary's bmm contracts 1)
                if args[1].shape[-2] >= hidden:  # the shrink x @ A contracts in_features, the expand the rank
                    self.widths.add(int(args[1].shape[-1]))
                    self.shrinks.add((int(args[1].shape[0]), int(args[1].shape[-1])))
                else:
                    self.widths.add(int(args[1].shape[-2]))
            elif func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default) and in_row_buffers(args[1]):  # a row's band, on views
                self.widths.add(int(args[1].shape[-1]))
                self.shrinks.add((1, int(args[1].shape[-1])))
            elif func in (torch.ops.aten.baddbmm.default, torch.ops.aten.baddbmm_.default):
                self.widths.add(int(args[2].shape[-2]))
            elif func._overloadpacket is torch.ops.aten.embedding_bag:
                per_row = args[1].numel() // args[2].numel()  # the expand sums `width` rows of B per row
                if per_row < hidden:  # (the shrink sums in_features >= hidden rows of A)
                    self.widths.add(per_row)
            return func(*args, **(kwargs or {}))

    kernel_call = BankCall.__call__

    def recording_call(self: BankCall, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor,
                       highest: int) -> torch.Tensor:
        if LoraWidths.active is not None:
            LoraWidths.active.widths.add(self.width)
            assert self.ranks is not None
            LoraWidths.active.row_widths.update(min(self.width, int(self.ranks[s])) for s in slots.tolist())
            LoraWidths.active.kernel_calls += 1
        return kernel_call(self, x, out, slots, highest)

    monkeypatch.setattr(BankCall, "__call__", recording_call)
    launches = count_step_kernel_calls(monkeypatch)
    kernel_calls = 0
    row_widths: set[int] = set()
    decode_shrinks: set[tuple[int, int]] = set()  # (rows, width) of the decode step's shrinks through bmm
    banded = path == "torch-row-buffers" or (path == "kernel" and load_bgmv() is None)  # decodes on row buffers
    big = _save(Case("llama-r16-all-linear", "llama", {"r": 16, "target_modules": "all-linear"}),
                model_dirs["llama"], tmp_path / "r16")
    hidden = load_model(model_dirs["llama"]).config.hidden_size
    assert hidden > 16
    sm = SlottedModel(load_model(model_dirs["llama"]), 3, **PATHS[path])  # type: ignore[arg-type]
    load_into(sm, 1, saved["llama-all-linear"].path)  # r=4
    load_into(sm, 2, saved["llama-r8-qv"].path)  # r=8
    ids = big.ids[:1].repeat(4, 1)

    def in_row_buffers(t: torch.Tensor) -> bool:
        return any(m.rows_a is not None and m.rows_a.data_ptr() <= t.data_ptr()
                   < m.rows_a.data_ptr() + m.rows_a.nbytes for m in sm.model.modules() if isinstance(m, SlotLoraLayer))

    def two_steps(rows: list[int]) -> tuple[torch.Tensor, set[int]]:
        """Prefill and one decode step of a batch routed to ``rows``: the decode logits, the widths (the
        kernel's per-row widths in ``row_widths``)."""
        widths, decode = LoraWidths(), LoraWidths()
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(rows), widths:
                nxt = sm.model(input_ids=ids[: len(rows)], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sm.sync_rows(rows)
            launched = len(launches)
            with sm.route(rows), decode:
                logits = sm.model(input_ids=nxt, cache=cache, use_cache=True).logits.float()
            decode.widths.update(launches[launched:])  # the GPU kernel's launches (no torch operator to see)
        nonlocal kernel_calls, row_widths, decode_shrinks
        kernel_calls += widths.kernel_calls + decode.kernel_calls
        row_widths = widths.row_widths | decode.row_widths
        decode_shrinks = decode.shrinks
        return logits, widths.widths | decode.widths

    rows = [1, 2, 0, 1]
    before, widths_before = two_steps(rows)
    load_into(sm, 3, big.path)
    after, widths_after = two_steps(rows)
    assert maxdiff(after, before) <= ATOL
    # before: each layer's capacity (4 where only the r=4 adapter reaches, 8 on q/v); after: the batch's
    # largest rank (8), never the new capacity (16). (Without row buffers, the single-token decode's
    # shrink still reads A's rows whole; its expand reads only 8 rows of each B.)
    # (on row buffers, a decode step multiplies bands of rank columns: 4 for every row, then 4 more for
    # the r=8 row, on q/v)
    assert widths_before == {4, 8} and widths_after == ({4, 8} if banded else {8})
    assert decode_shrinks == ({(4, 4), (1, 4)} if banded else set())  # (elsewhere: the kernel, or embedding_bag)
    mixed, widths_mixed = two_steps([1, 3, 2])
    assert widths_mixed == ({4, 8, 16} if banded else {16})
    if banded:  # the r=4, r=16 and r=8 rows: all three up to 4, two of them (row by row) up to 8, one up to 16
        assert decode_shrinks == {(3, 4), (1, 4), (1, 8)}
    if path == "kernel" and load_bgmv() is not None:
        # rows of slots 1 (r=4) and 2 (r=8 on q/v, nothing elsewhere) next to r=16 rows
        assert row_widths == {0, 4, 8, 16}
    for i, slot in enumerate([1, 3, 2]):
        alone, _ = two_steps([slot])
        assert maxdiff(mixed[i:i + 1], alone) <= ATOL, (i, slot)
    assert maxdiff(mixed[1:2], before[0:1]) > MIN_EFFECT  # slot 3 really is another adapter
    sm.clear(3)
    cleared, widths_cleared = two_steps(rows)
    assert maxdiff(cleared, before) <= ATOL and widths_cleared == ({4, 8} if banded else {8})
    # the forwards ran the compiled kernel wherever it can be built here, the GPU kernel on its path
    assert (kernel_calls > 0) == (path == "kernel" and load_bgmv() is not None)
    assert bool(launches) == (path == "triton")


@pytest.mark.parametrize("path", [p for p in PATHS if p != "triton"])  # (the GPU kernel refuses float32 products on a
# bfloat16 model: tests/core/test_gpu_bgmv.py)
def test_float32_slots_on_a_bfloat16_model_compute_lora_as_peft_does(path: str, saved: dict[str, Saved],
                                                                    model_dirs: dict[str, Path]) -> None:
    """``SlottedModel(dtype=torch.float32)`` on a bfloat16 model (the server's
    ``ADAPTERFORGE_ADAPTER_DTYPE=float32``) computes LoRA as PEFT does there: adapter weights and products
    in float32, each layer's output rounded to bfloat16. Rows on one adapter through torch's products
    equal PEFT's forward exactly where every scaling is a power of two (the slots hold B pre-scaled,
    which is then exact); elsewhere (alpha 5 / r 8, alpha 8 / r 3), through the kernel, and in a mixed
    batch, float32 sums in another order flip a bfloat16 rounding now and then (on some CPUs and not
    others), and rows end up much closer to PEFT's forward of their adapter than with bfloat16 slots
    (prefill and a decode step)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    names = ["llama-all-linear", "llama-rslora", "llama-r8-qv", "llama-rank-alpha-pattern"]
    exact = {"llama-all-linear", "llama-rslora", "llama-r8-qv"}  # scalings 1 and 2
    ids = saved[names[0]].ids

    def base(dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=dtype).eval()

    def two_steps(call: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the prompt's last position and of one decode step on a cache (fed the same token)."""
        with torch.inference_mode():
            cache = DynamicCache()
            first = call(ids, cache).logits[:, -1].float()  # type: ignore[operator]
            step = call(torch.full((len(ids), 1), 7), cache).logits[:, -1].float()  # type: ignore[operator]
        return first, step

    def slotted(dtype: torch.dtype) -> SlottedModel:
        sm = SlottedModel(base(torch.bfloat16), len(names), dtype=dtype, **PATHS[path])  # type: ignore[arg-type]
        for slot, name in enumerate(names, start=1):
            load_into(sm, slot, saved[name].path)
        return sm

    def routed(sm: SlottedModel, slots: list[int]) -> object:
        def call(x: torch.Tensor, cache: DynamicCache) -> object:
            if x.shape[1] == 1:
                sm.sync_rows(slots)
            with sm.route(slots):
                return sm.model(input_ids=x, cache=cache, use_cache=True)
        return call

    fp32_slots, bf16_slots = slotted(torch.float32), slotted(torch.bfloat16)
    assert fp32_slots.dtype == torch.float32 and bf16_slots.dtype == torch.bfloat16
    mixed = {"fp32": two_steps(routed(fp32_slots, [1, 2, 3, 4])), "bf16": two_steps(routed(bf16_slots, [1, 2, 3, 4]))}
    gaps = {"fp32": 0.0, "bf16": 0.0}
    alone_gaps = {"fp32": 0.0, "bf16": 0.0}
    for i, name in enumerate(names):
        pm = PeftModel.from_pretrained(base(torch.bfloat16), saved[name].path).eval()
        peft_bf16 = two_steps(lambda x, cache, pm=pm: pm(input_ids=x, cache=cache, use_cache=True))
        alone = {"fp32": two_steps(routed(fp32_slots, [i + 1] * len(ids))),
                 "bf16": two_steps(routed(bf16_slots, [i + 1] * len(ids)))}
        for position in range(2):
            if name in exact and (path != "kernel" or fp32_slots.cpu_kernel is None):
                assert torch.equal(alone["fp32"][position], peft_bf16[position]), (name, position)
            for kind in gaps:
                gaps[kind] += (mixed[kind][position][i] - peft_bf16[position][i]).abs().mean().item()
                alone_gaps[kind] += (alone[kind][position] - peft_bf16[position]).abs().mean().item()
    assert gaps["fp32"] < 0.5 * gaps["bf16"], gaps
    assert alone_gaps["fp32"] < 0.5 * alone_gaps["bf16"], alone_gaps


@pytest.mark.parametrize("path", PATH_IDS)
def test_float16_slot_weights_under_float32_products(path: str, saved: dict[str, Saved], model_dirs: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``SlottedModel(weight_dtype=torch.float16)`` on a float32 model (the server's
    ``ADAPTERFORGE_ADAPTER_DTYPE=float16``) keeps LoRA A and B in half the memory and computes exactly
    what float32 slots compute from the same weights rounded to float16: bit for bit through the compiled
    kernel, which converts as it loads, and within float32 summation noise through torch's paths. Mixed
    rows (LoRA, DoRA, an embedding adapter, the base model) in a prefill and a decode step; every
    adapter's rows stay within float16's rounding of PEFT's float32 logits, greedy tokens included."""
    from transformers import DynamicCache

    names = ["llama-all-linear", "llama-dora", "llama-embed_tokens", "llama-rank-alpha-pattern", "llama-r8-qv"]
    ids = saved[names[0]].ids
    slots = [1, 2, 3, 4, 5, 0, 1]
    batch_ids = ids[torch.tensor([0, 1, 2, 3, 0, 1, 2])]

    def loaded(weight_dtype: torch.dtype | None, round_to_half: bool) -> SlottedModel:
        sm = SlottedModel(load_model(model_dirs["llama"]), len(names), weight_dtype=weight_dtype,
                          **PATHS[path])  # type: ignore[arg-type]
        for slot, name in enumerate(names, start=1):
            config, tensors = read_adapter(saved[name].path)
            prepared = sm.prepare(config, tensors)
            if round_to_half:
                for weights in prepared.layers.values():
                    assert weights.a is not None and weights.b is not None
                    weights.a, weights.b = weights.a.half().float(), weights.b.half().float()
            sm.load(slot, prepared)
        return sm

    def two_steps(sm: SlottedModel, x: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(rows):
                first = sm.model(input_ids=x, cache=cache, use_cache=True).logits[:, -1].float()
            sm.sync_rows(rows)
            with sm.route(rows):
                step = sm.model(input_ids=first.argmax(-1, keepdim=True), cache=cache, use_cache=True)
        return first, step.logits[:, -1].float()

    half, rounded = loaded(torch.float16, False), loaded(None, True)
    layers = [m for m in half.model.modules() if isinstance(m, SlotLoraLayer)]
    assert layers and all(m.a is not None and m.a.dtype == m.b.dtype == torch.float16 for m in layers)  # type: ignore[union-attr]
    half_bytes = sum(m.a.nbytes + m.b.nbytes for m in layers)  # type: ignore[union-attr]
    full_bytes = sum(m.a.nbytes + m.b.nbytes for m in rounded.model.modules() if isinstance(m, SlotLoraLayer))  # type: ignore[union-attr]
    assert 2 * half_bytes == full_bytes

    want = two_steps(rounded, batch_ids, slots)
    half_calls = []
    kernel_call = BankCall.__call__

    def recording_call(self: BankCall, *args: object) -> torch.Tensor:
        half_calls.append(self)
        return kernel_call(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(BankCall, "__call__", recording_call)
    got = two_steps(half, batch_ids, slots)
    kernel = path == "kernel" and half.cpu_kernel is not None
    assert bool(half_calls) == kernel
    for position in range(2):
        if kernel:
            assert torch.equal(got[position], want[position]), position
        else:
            assert maxdiff(got[position], want[position]) <= ATOL, position
    for row, slot in enumerate(slots):  # the prompt's last position against PEFT's float32 forward
        if slot:
            peft_logits = saved[names[slot - 1]].logits[[0, 1, 2, 3, 0, 1, 2][row], -1]
            assert maxdiff(got[0][row], peft_logits) <= 1e-3, (row, names[slot - 1])
            assert int(got[0][row].argmax()) == int(peft_logits.argmax())
            assert maxdiff(got[0][row], got[0][5]) > MIN_EFFECT  # not the base row


def test_float16_slot_weights_are_refused_where_they_do_not_fit(saved: dict[str, Saved],
                                                                model_dirs: dict[str, Path]) -> None:
    """float16 storage exists only under float32 products; a value float16 cannot hold (it would be Inf in
    the slot) refuses the adapter, naming the layer, before any slot changes."""
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="float16 under float32") as info:
        SlottedModel(bf16, 2, weight_dtype=torch.float16)
    assert info.value.field == "weight_dtype"
    sm = SlottedModel(load_model(model_dirs["llama"]), 2, weight_dtype=torch.float16)
    config, tensors = read_adapter(saved["llama-r8-qv"].path)
    load_into(sm, 1, saved["llama-r8-qv"].path)
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 1e6
    with pytest.raises(NonFiniteWeightsError, match=r"q_proj lora_B \(scaled\) holds values up to"):
        sm.prepare(config, tensors)
    assert maxdiff(routed_logits(sm, saved["llama-r8-qv"].ids, [1] * 4), saved["llama-r8-qv"].logits) <= 1e-3



@pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING))
def test_a_fused_kernel_that_cannot_launch_leaves_decode_steps_to_torch(
        saved: dict[str, Saved], model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A Triton that cannot compile for the GPU (its first launch raises) must not break serving: the step
    that hit it and every later one compute the same products through torch, and the failure is logged
    once."""
    import logging

    from transformers import DynamicCache

    names = ["llama-r8-qv", "llama-all-linear"]
    rows = [1, 2, 0, 1]
    ids = saved[names[0]].ids[:1].repeat(len(rows), 1)

    def loaded(**paths: object) -> SlottedModel:
        sm = SlottedModel(load_model(model_dirs["llama"]), len(names), **paths)  # type: ignore[arg-type]
        for slot, name in enumerate(names, start=1):
            load_into(sm, slot, saved[name].path)
        return sm

    def decode_twice(sm: SlottedModel) -> list[torch.Tensor]:
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(rows):
                nxt = sm.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(2):
                with sm.route(rows):
                    steps.append(sm.model(input_ids=nxt, cache=cache, use_cache=True).logits.float())
        return steps

    want = decode_twice(loaded(**PATHS["torch-bank"]))
    fused = loaded(**PATHS["triton"])
    kernel = fused.gpu_kernel
    assert kernel is not None

    class CannotCompile:
        calls = 0

        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                CannotCompile.calls += 1
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(kernel, "_kernel", CannotCompile())
    monkeypatch.setattr(kernel, "failure", None)
    monkeypatch.setattr(kernel, "_launched", set())  # (a GPU where no variant has compiled yet)
    with caplog.at_level(logging.ERROR, logger="adapters_core.serving.gpu_bgmv"):
        got = decode_twice(fused)
    for step_got, step_want in zip(got, want, strict=True):
        assert maxdiff(step_got, step_want) <= ATOL
    assert kernel.failure == "RuntimeError: PassManager::run failed"
    assert CannotCompile.calls == 1 and caplog.text.count("failed to launch") == 1  # tried once, not every layer


@pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_decode_steps_equal_torch_for_every_servable_case(arch: str, saved: dict[str, Saved],
                                                                 model_dirs: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LoRA variant of the conformance table (GPT-2's ``Conv1D`` layers included) in one mixed decode step
    through the fused GPU kernel gives what torch's operators give. A layer where some row's adapter has what
    the kernel does not take (DoRA, ``lora_bias``, trained biases) runs on torch for that step; without such
    rows, the kernel runs every layer."""
    from transformers import DynamicCache

    def decode(cases: list[Case], paths: dict[str, object]) -> torch.Tensor:
        rows = [0, *range(1, len(cases) + 1), 1]
        ids = saved[cases[0].id].ids[:1].repeat(len(rows), 1)
        sm = SlottedModel(load_model(model_dirs[arch]), len(cases), **paths)  # type: ignore[arg-type]
        for slot, case in enumerate(cases, start=1):
            load_into(sm, slot, saved[case.id].path)
        with torch.inference_mode():
            cache = DynamicCache()
            with sm.route(rows):
                nxt = sm.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                return sm.model(input_ids=nxt, past_key_values=cache, use_cache=True).logits.float()

    every = [c for c in SERVABLE if c.arch == arch]
    plain = [c for c in every if not (c.kw.get("use_dora") or c.kw.get("lora_bias") or c.kw.get("bias", "none") != "none")]
    assert len(plain) >= 3
    launches = count_step_kernel_calls(monkeypatch)
    for cases in (every, plain):
        want = decode(cases, PATHS["torch-bank"])
        before = len(launches)
        got = decode(cases, PATHS["triton"])
        assert maxdiff(got, want) <= ATOL, [c.id for c in cases]
    assert len(launches) > before  # the plain batch's decode step went through the kernel


class RecordingKernel:
    """Stands in for one of the fused kernel's Triton functions: runs it, and adds each launch's compile key to
    ``keys`` as Triton forms it (a new key is a new compile): the kernel, its tensors' dtypes and 16-byte
    alignment, each integer argument's class (1, a multiple of 16, other) unless the kernel leaves that
    argument general (``do_not_specialize``), and the constexprs."""

    def __init__(self, jitted: object, keys: set[tuple[object, ...]]) -> None:
        self.jitted, self.keys = jitted, keys
        self.general = set(getattr(jitted, "kwargs", {}).get("do_not_specialize") or ())

    def _key(self, args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[object, ...]:
        parts: list[object] = [getattr(self.jitted, "fn", self.jitted).__name__]  # type: ignore[attr-defined]
        for name, value in zip(self.jitted.arg_names, args, strict=False):  # type: ignore[attr-defined]
            if isinstance(value, torch.Tensor):
                parts.append((name, value.dtype, value.data_ptr() % 16 == 0))
            elif isinstance(value, int) and name not in self.general:
                parts.append((name, "1" if value == 1 else "16k" if value % 16 == 0 else "other"))
        return (*parts, *sorted(kwargs.items()))

    def __getitem__(self, grid: object) -> object:
        def launch(*args: object, **kwargs: object) -> object:
            self.keys.add(self._key(args, kwargs))
            return self.jitted[grid](*args, **kwargs)  # type: ignore[index]
        return launch


@pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING))
def test_gpu_kernel_warm_up_compiles_every_variant_serving_launches(
        saved: dict[str, Saved], model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The server warms the fused kernel up before it takes requests so that no served step stops for Triton's
    compiler: every launch of prefills and decode steps that follow (adapters of ranks 4 to 24, rows on one
    adapter or several, prompts of several lengths) must have a compile key the warm-up already launched."""
    from transformers import DynamicCache

    wide = _save(Case("llama-r24-qv", "llama", {"r": 24, "lora_alpha": 16, "target_modules": QV}),
                 model_dirs["llama"], tmp_path / "r24")
    sm = SlottedModel(load_model(model_dirs["llama"]), 4, max_rank=32, **PATHS["triton"])  # type: ignore[arg-type]
    kernel = sm.gpu_kernel
    assert kernel is not None
    warm: set[tuple[object, ...]] = set()
    served: set[tuple[object, ...]] = set()
    shrink, expand = kernel._prefill_kernel
    recording = GpuBgmv(RecordingKernel(kernel._kernel, warm),
                        (RecordingKernel(shrink, warm), RecordingKernel(expand, warm)), interpret=True)
    sm.use_gpu_kernel(recording)
    # llama's linear layers have 4 shapes (q/o, k/v, gate/up, down) and lm_head one more; rank blocks 16 and 32;
    # per shape and block one decode launch and two prefill launches
    shapes = {(m.in_features, m.out_features) for m in sm.model.modules() if isinstance(m, torch.nn.Linear)}
    assert sm.warm_up_gpu_kernel() == len(shapes) * 2 * 3 == recording.launches
    assert {key[0] for key in warm} == {"bgmv_step", "sgmv_shrink", "sgmv_expand"}
    for recorder in (recording._kernel, *recording._prefill_kernel):
        recorder.keys = served
    for slot, path in enumerate([saved["llama-all-linear"].path, saved["llama-r8-qv"].path,
                                 saved["llama-rslora"].path, wide.path], start=1):
        load_into(sm, slot, path)
    ids = saved["llama-r8-qv"].ids
    with torch.inference_mode():
        for rows, length in (([1, 2, 0, 3], 8), ([2, 2, 0, 2], 5), ([4, 1, 2, 0], 7), ([1, 4, 4, 3], 3)):
            cache = DynamicCache()
            with sm.route(rows):
                nxt = sm.model(input_ids=ids[:, :length], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(2):
                with sm.route(rows):
                    nxt = sm.model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert {key[0] for key in served} == {"bgmv_step", "sgmv_shrink", "sgmv_expand"}
    assert served <= warm, sorted(map(str, served - warm))
