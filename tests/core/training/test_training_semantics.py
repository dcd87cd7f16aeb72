"""The training loop's hyperparameters against HF Trainer + peft semantics and docs/training.md (a plain
torch loop over an HF peft model, and transformers' own scheduler and warmup count, are the references)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainingArguments, get_scheduler

from adapters_core import AdapterModel, ConfigError, LoraConfig
from adapters_core.training.api import train_adapter
from adapters_core.training.hyperparameters import Hyperparameters
from adapters_core.training.loop import Trainer
from tests.conftest import load_model
from tests.core.training.test_loop import Recorder

# ----------------------------------------------------------------------------------------- helpers
# A row is (row_id, input_ids, labels); the collate records which rows it was given.


def _rows(n: int, seed: int = 0, min_len: int = 6, max_len: int = 12, masked: float = 0.3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(10, 300, (length,), generator=g).tolist()
        keep = (torch.rand(length, generator=g) >= masked).tolist()
        labels = [t if k else -100 for t, k in zip(ids, keep, strict=True)]
        labels[-1] = ids[-1]
        out.append((i, ids, labels))
    return out


class Collate:
    """Right-padded collate that remembers every row id it was given."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, rows: list[tuple]) -> dict[str, torch.Tensor]:
        self.seen.extend(r[0] for r in rows)
        return _pad(rows)


def _pad(rows: list[tuple]) -> dict[str, torch.Tensor]:
    length = max(len(r[1]) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (_, i, lab) in enumerate(rows):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _model(path: Path, dropout: float = 0.0, init_seed: int = 0) -> AdapterModel:
    am = AdapterModel(load_model(path))
    torch.manual_seed(init_seed)
    am.add_adapter("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]))
    return am


def _weights(am: AdapterModel, name: str = "a") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in am.adapter_state_dict(name).items()}


def _used_lrs(trainer: Trainer) -> list[float]:
    """The learning rate each optimizer step actually applies (read just before the step)."""
    used: list[float] = []
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    return used


def _hp(**kw: Any) -> Hyperparameters:
    base: dict[str, Any] = {"learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0}
    return Hyperparameters(**{**base, **kw})


# ============================================================================ what each setting does


def test_epochs_pass_over_each_row_exactly_epochs_times_with_accumulation(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """10 rows, batch 2 (5 micro-batches per epoch), accumulation 2, epochs=2. HF Trainer (and the
    docs: "epochs: passes over the data") see every row exactly twice, the last step of each epoch taking the
    leftover micro-batch (accumulation groups that straddled epochs once ran 12 micro-batches: 4 rows
    trained on 3 times)."""
    rows = _rows(10)
    collate = Collate()
    hp = _hp(epochs=2, batch_size=2, gradient_accumulation_steps=2)
    result = Trainer(_model(tiny_llama_dir), "a", rows, collate, hp, tmp_path).train()
    assert result.global_step == 6  # HF: ceil(5 / 2) = 3 optimizer steps per epoch, too
    assert Counter(collate.seen) == {i: 2 for i in range(10)}


def test_progress_learning_rate_is_the_rate_the_step_used(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Progress.learning_rate (and so the job's `learning_rate` metric) is the rate the step used, as HF
    Trainer logs it (read after scheduler.step() it was the next step's: 0 at the end of a linear run)."""
    recorder = Recorder()
    hp = _hp(max_steps=4, batch_size=2, lr_scheduler="linear")
    trainer = Trainer(_model(tiny_llama_dir), "a", _rows(8), Collate(), hp, tmp_path, callbacks=recorder)
    used = _used_lrs(trainer)
    trainer.train()
    assert used == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])  # the optimizer is right
    assert [p.learning_rate for p in recorder.progress] == pytest.approx(used)


def test_warmup_ratio_gives_as_many_warmup_steps_as_hf_trainer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Warmup steps are ceil(total * warmup_ratio), as HF Trainer counts them (rounded down, the default
    0.03 gave any run under 34 steps no warmup at all)."""
    total, ratio = 15, 0.1
    hf_warmup = TrainingArguments(output_dir=str(tmp_path / "hf"), warmup_steps=ratio).get_warmup_steps(total)
    assert hf_warmup == math.ceil(ratio * total) == 2
    hp = _hp(max_steps=total, batch_size=4, lr_scheduler="linear", warmup_ratio=ratio)
    trainer = Trainer(_model(tiny_llama_dir), "a", _rows(8), Collate(), hp, tmp_path / "run")
    used = _used_lrs(trainer)
    trainer.train()
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = get_scheduler("linear", ref_opt, num_warmup_steps=hf_warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert used == pytest.approx(expected)


def test_eval_loss_ignores_a_batch_without_loss_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """evaluate() adds float(out.loss) * n per batch; a batch whose labels are all -100 (e.g. a
    validation completion whose prompt fills max_seq_len) has out.loss = NaN and NaN * 0 = NaN, so the whole
    eval loss is NaN, no later eval can beat it, and best/ / early stopping break. Training already guards
    this case; evaluation does not."""
    eval_rows = _rows(3, seed=5)
    _, ids, _ = _rows(1, seed=6)[0]
    eval_rows.append((99, ids, [-100] * len(ids)))  # nothing to predict: adds 0 tokens
    hp = _hp(max_steps=1, batch_size=1, eval_steps=1)
    am = _model(tiny_llama_dir)
    trainer = Trainer(am, "a", _rows(4), Collate(), hp, tmp_path, eval_rows=eval_rows)
    result = trainer.train()
    loss = result.evals[0].loss
    assert math.isfinite(loss), f"eval loss {loss}"
    # and it is the token mean over the other rows
    am.eval()
    with torch.no_grad():
        num = den = 0.0
        for row in eval_rows[:3]:
            b = _pad([row])
            n = int((b["labels"][:, 1:] != -100).sum())
            num += float(am(**b).loss) * n
            den += n
    assert loss == pytest.approx(num / den, rel=1e-5)


def test_seed_fixes_the_adapter_init_in_train_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """docs: `seed` sets "data order, dropout and init". train_adapter adds the adapter (random
    LoRA A init) before the Trainer seeds torch, so two jobs with the same seed, data and hyperparameters
    train different adapters whenever the process's global RNG differs (every worker job does)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [json.dumps({"text": f"example number {i} says hello"}) for i in range(4)]
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # whatever ran before in this process
        am = AdapterModel(load_model(tiny_llama_dir))
        train_adapter(am, tok, "x", LoraConfig(r=4, target_modules=["q_proj"]), lines,
                      _hp(max_steps=2, batch_size=2, max_seq_len=32, seed=42), tmp_path / str(global_seed))
        weights.append(_weights(am, "x"))
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


@pytest.mark.parametrize("name", ["packing", "train_on_inputs", "gradient_checkpointing"])
@pytest.mark.parametrize("value", ["false", None, 0])
def test_boolean_hyperparameters_refuse_non_booleans(name: str, value: Any) -> None:
    """docs: "bad values raise ConfigError naming the field". Every number/enum field is checked,
    but the three booleans take anything: packing="false" silently packs (a truthy string), and
    train_on_inputs=None silently means False."""
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({name: value})
    assert err.value.field == name


def test_validation_split_taking_every_example_names_validation_split(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """validation_split=0.9 of 2 examples holds both out (round(1.8) = 2), leaving no training
    example. The error blames max_seq_len ("no training example keeps a token in the loss within
    max_seq_len=...; raise max_seq_len") instead of naming validation_split."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [json.dumps({"text": f"hello world {i}"}) for i in range(2)]
    am = AdapterModel(load_model(tiny_llama_dir))
    with pytest.raises(ConfigError) as err:
        train_adapter(am, tok, "x", LoraConfig(r=4, target_modules=["q_proj"]), lines,
                      _hp(max_steps=1, batch_size=2, max_seq_len=32), tmp_path, validation_split=0.9)
    assert err.value.field == "validation_split", str(err.value)


def test_resumed_run_still_reports_its_best_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """TrainResult.best_checkpoint is only set when an eval improves in this call to train(); a run
    resumed after its best eval reports best_checkpoint=None although best/ holds that adapter (and
    position.best_step says so). The uninterrupted run reports best/."""
    train, held = _rows(4, seed=1, masked=0.0), _rows(4, seed=2, masked=0.0)
    hp = _hp(max_steps=6, batch_size=4, learning_rate=5e-2, eval_steps=2, save_steps=2)
    full = Trainer(_model(tiny_llama_dir), "a", train, Collate(), hp, tmp_path / "full", eval_rows=held).train()
    losses = [e.loss for e in full.evals]
    assert losses.index(min(losses)) == 0, losses  # the premise: the best eval is the first (step 2)
    assert full.best_checkpoint == tmp_path / "full" / "best"

    recorder = Recorder()
    recorder.cancel_at = 5
    part = Trainer(_model(tiny_llama_dir), "a", train, Collate(), hp, tmp_path / "part", eval_rows=held,
                   callbacks=recorder).train()
    assert part.status == "cancelled" and part.last_checkpoint is not None
    rest = Trainer(_model(tiny_llama_dir), "a", train, Collate(), hp, tmp_path / "part",
                   eval_rows=held).train(resume_from=part.last_checkpoint)
    assert rest.status == "completed" and (tmp_path / "part" / "best").is_dir()
    assert rest.best_checkpoint == tmp_path / "part" / "best"


# =================================================================================== SOUND (pass)


def test_loop_matches_plain_torch_loop_over_hf_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Reference: HF peft model from the same initial adapter, same documented order (randperm seeded by
    seed + epoch), token-mean accumulation, clip_grad_norm_ over the adapter parameters, AdamW with weight
    decay on the LoRA matrices, transformers' cosine schedule with warmup. 7 rows / batch 2 = 4 micro-batches
    per epoch (last one short), accumulation 2, 6 steps = 3 epochs."""
    from peft import PeftModel

    rows = _rows(7, seed=3)
    seed, total, warmup, max_norm = 5, 6, 3, 0.05
    hp = Hyperparameters(max_steps=total, batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-2,
                         lr_scheduler="cosine", warmup_ratio=0.5, weight_decay=0.1, max_grad_norm=max_norm,
                         seed=seed)
    ours = _model(tiny_llama_dir)
    ours.save_adapter(tmp_path / "init", "a")
    result = Trainer(ours, "a", rows, Collate(), hp, tmp_path / "ours").train()
    ours.save_adapter(tmp_path / "ours_final", "a")

    ref = PeftModel.from_pretrained(load_model(tiny_llama_dir), str(tmp_path / "init"), is_trainable=True)
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    assert all(p.dim() == 2 for p in params)
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=total)
    micro = []
    for epoch in range(3):
        order = torch.randperm(7, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro += [[rows[j] for j in order[i : i + 2]] for i in range(0, 7, 2)]
    losses, norms = [], []
    for step in range(total):
        group = [_pad(m) for m in micro[2 * step : 2 * step + 2]]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        step_loss = 0.0
        for b in group:
            loss = ref(**b).loss * int((b["labels"][:, 1:] != -100).sum()) / tokens
            loss.backward()
            step_loss += float(loss)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(step_loss)
    ref.save_pretrained(str(tmp_path / "ref_final"))

    assert max(norms) > max_norm  # clipping was in play
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    a = load_file(tmp_path / "ours_final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref_final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # (Adam divides each update by its gradient's running size: an element whose gradient is near
        # zero moves by float-rounding differences between the two forwards, 2.6e-5 on one CPU of 1e-1 weights;
        # a wrong schedule, order or accumulation moves every element, and the losses above, by far more)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_accumulating_four_micro_batches_of_one_equals_one_batch_of_four(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _rows(8, seed=4)
    runs = []
    for bs, accum in ((4, 1), (1, 4)):
        am = _model(tiny_llama_dir)
        hp = _hp(max_steps=2, batch_size=bs, gradient_accumulation_steps=accum, weight_decay=0.1, max_grad_norm=0.1)
        runs.append((Trainer(am, "a", rows, Collate(), hp, tmp_path / str(bs)).train(), _weights(am)))
    (big, w_big), (small, w_small) = runs
    torch.testing.assert_close(torch.tensor(small.losses), torch.tensor(big.losses), rtol=1e-5, atol=1e-6)
    for key, value in w_big.items():
        torch.testing.assert_close(w_small[key], value, rtol=1e-4, atol=1e-6)


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _rows(9)
    out = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        am = _model(tiny_llama_dir, dropout=0.2)
        collate = Collate()
        torch.manual_seed(123 if tag == "b" else 0)  # the global RNG before train() does not matter
        res = Trainer(am, "a", rows, collate, _hp(epochs=2, batch_size=2, seed=seed), tmp_path / tag).train()
        out[tag] = (res.losses, collate.seen, _weights(am))
    assert out["a"][0] == out["b"][0] and out["a"][1] == out["b"][1]
    assert all(torch.equal(out["a"][2][k], out["b"][2][k]) for k in out["a"][2])
    assert out["a"][1] != out["c"][1]
    assert sorted(out["a"][1][:9]) == list(range(9)) and sorted(out["a"][1][9:]) == list(range(9))
    assert out["a"][1][:9] != out["a"][1][9:]  # reshuffled per epoch


def test_weight_decay_groups_are_matrices_only(tiny_llama_dir: Path, tmp_path: Path) -> None:
    am = AdapterModel(load_model(tiny_llama_dir))
    am.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    trainer = Trainer(am, "a", _rows(2), Collate(), _hp(max_steps=1, weight_decay=0.3), tmp_path)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])  # the saved norm's weight


def test_best_adapter_is_the_lowest_eval_loss_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    held = _rows(4, seed=2, masked=0.0)
    hp = _hp(max_steps=8, batch_size=4, learning_rate=5e-2, eval_steps=1)
    result = Trainer(_model(tiny_llama_dir), "a", _rows(4, seed=1, masked=0.0), Collate(), hp, tmp_path,
                     eval_rows=held).train()
    best = min(result.evals, key=lambda e: e.loss)
    fresh = AdapterModel(load_model(tiny_llama_dir))
    fresh.load_adapter(result.best_checkpoint, "a")
    fresh.eval()
    b = _pad(held)
    with torch.no_grad():
        assert float(fresh(**b).loss) == pytest.approx(best.loss, rel=1e-5)


def test_packing_and_padding_give_the_same_first_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [json.dumps({"prompt": f"Question {i} is", "completion": f" answer {i * 7}"}) for i in range(5)]
    out = {}
    for packing in (True, False):
        torch.manual_seed(0)
        am = AdapterModel(load_model(tiny_llama_dir))
        o = train_adapter(am, tok, "x", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), lines,
                          _hp(max_steps=1, batch_size=8, max_seq_len=64, packing=packing), tmp_path / str(packing))
        out[packing] = (o.result.losses, _weights(am, "x"))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for key, value in out[False][1].items():
        torch.testing.assert_close(out[True][1][key], value, rtol=1e-4, atol=1e-7)
