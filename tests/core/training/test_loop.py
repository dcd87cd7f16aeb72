"""The training loop: it learns, it resumes exactly, it stops early, it cancels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_core import AdapterModel, ConfigError, LoraConfig
from adapters_core.training.hyperparameters import Hyperparameters
from adapters_core.training.loop import EvalResult, NoCallbacks, Progress, Trainer
from tests.conftest import load_model


def _rows(n: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (length,), generator=g).tolist() for _ in range(n)]


def _collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    return {"input_ids": ids, "labels": ids.clone()}


def _model(path: Path, targets: Any = ("q_proj", "v_proj"), **kw: Any) -> AdapterModel:
    am = AdapterModel(load_model(path))
    torch.manual_seed(0)
    am.add_adapter("a", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(targets), **kw))
    return am


class Recorder(NoCallbacks):
    def __init__(self, cancel_at: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.evals: list[EvalResult] = []
        self.cancel_at = cancel_at

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_eval(self, result: EvalResult) -> None:
        self.evals.append(result)

    def should_cancel(self) -> bool:
        return self.cancel_at is not None and bool(self.progress) and self.progress[-1].step >= self.cancel_at


def _weights(am: AdapterModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in am.adapter_state_dict("a").items()}


HP_RESUME = Hyperparameters(max_steps=6, batch_size=2, gradient_accumulation_steps=2, save_steps=2,
                            learning_rate=1e-2, warmup_ratio=0.2, seed=3)


def test_resumed_run_matches_uninterrupted_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _rows(10)
    hp = HP_RESUME
    full_model = _model(tiny_llama_dir)
    full = Trainer(full_model, "a", rows, _collate, hp, tmp_path / "full").train()
    assert full.status == "completed" and len(full.losses) == 6

    stopped_model = _model(tiny_llama_dir)
    stopped = Trainer(stopped_model, "a", rows, _collate, hp, tmp_path / "stopped", callbacks=Recorder(cancel_at=3))
    part = stopped.train()
    assert part.status == "cancelled" and part.global_step == 3
    assert part.last_checkpoint == tmp_path / "stopped" / "checkpoint-2"

    resumed_model = _model(tiny_llama_dir)
    rest = Trainer(resumed_model, "a", rows, _collate, hp, tmp_path / "stopped").train(resume_from=part.last_checkpoint)
    assert rest.status == "completed" and rest.global_step == 6
    torch.testing.assert_close(torch.tensor(rest.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    for key, value in _weights(full_model).items():
        torch.testing.assert_close(_weights(resumed_model)[key], value, rtol=1e-5, atol=1e-6)


def test_only_the_newest_checkpoints_are_kept(tiny_llama_dir: Path, tmp_path: Path) -> None:
    hp = Hyperparameters(max_steps=7, batch_size=2, save_steps=1, save_total_limit=2, learning_rate=1e-3)
    result = Trainer(_model(tiny_llama_dir), "a", _rows(8), _collate, hp, tmp_path / "out").train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert result.last_checkpoint == tmp_path / "out" / "checkpoint-6"
    keep_all = Hyperparameters(max_steps=4, batch_size=2, save_steps=1, save_total_limit=None, learning_rate=1e-3)
    Trainer(_model(tiny_llama_dir), "a", _rows(8), _collate, keep_all, tmp_path / "all").train()
    assert len(list((tmp_path / "all").glob("checkpoint-*"))) == 3


def test_training_lowers_loss_and_reports_progress(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _rows(4, seed=1)
    recorder = Recorder()
    hp = Hyperparameters(max_steps=25, batch_size=4, learning_rate=5e-2, lr_scheduler="constant", warmup_ratio=0.0)
    model = _model(tiny_llama_dir, modules_to_save=["lm_head"])
    result = Trainer(model, "a", rows, _collate, hp, tmp_path, callbacks=recorder).train()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert [p.step for p in recorder.progress] == list(range(1, 26))
    assert all(p.total_steps == 25 and p.tokens_per_second > 0 for p in recorder.progress)
    assert recorder.progress[-1].eta_seconds == 0


def test_early_stopping_keeps_best_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    train_rows, eval_rows = _rows(4, seed=1), _rows(4, seed=2)  # memorising random rows hurts held-out loss
    hp = Hyperparameters(max_steps=40, batch_size=4, learning_rate=5e-2, lr_scheduler="constant", warmup_ratio=0.0,
                         eval_steps=2, early_stopping_patience=2)
    recorder = Recorder()
    am = _model(tiny_llama_dir)
    result = Trainer(am, "a", train_rows, _collate, hp, tmp_path, eval_rows=eval_rows, callbacks=recorder).train()
    assert result.status == "early_stopped" and result.global_step < 40
    losses = [e.loss for e in recorder.evals]
    best = min(losses)
    assert losses[-1] > best and losses[-2] > best  # two evaluations without improvement
    assert result.best_checkpoint is not None and (result.best_checkpoint / "adapter_model.safetensors").exists()


def test_hyperparameters_name_the_bad_field() -> None:
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({"learning_rate": -1})
    assert err.value.field == "learning_rate"
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({"epochz": 3})
    assert err.value.field == "epochz"
    with pytest.raises(ConfigError) as err:
        Hyperparameters(lr_scheduler="exotic")
    assert err.value.field == "lr_scheduler"


def test_two_process_ddp_matches_single_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo) with the same global batch train the same adapter as 1 process."""
    import json
    import os
    import subprocess
    import sys

    import psutil
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[3]
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"world{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + n + os.getpid() % 1000), str(worker), str(tiny_llama_dir), str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # the ranks run in sessions of their own: kill them by ancestry, then the launcher
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"world {n} did not finish in 300 s: {stderr[-3000:]}")
        assert proc.returncode == 0, stderr[-3000:]
        outs[n] = (json.loads((out / "result.json").read_text()), load_file(out / "adapter" / "adapter_model.safetensors"))
    (single, w1), (ddp, w2) = outs[1], outs[2]
    assert single["world"] == 1 and ddp["world"] == 2 and ddp["steps"] == 4
    assert ddp["ddp_freed"]  # Trainer.close freed the DDP wrapper before destroying the group
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5)
    for key, value in w1.items():
        torch.testing.assert_close(w2[key], value, rtol=1e-4, atol=1e-5)


def test_run_killed_with_sigkill_resumes_from_last_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A real SIGKILL mid-run (no cleanup): the resumed run ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys

    from adapters_core.training.loop import latest_checkpoint

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.core.training.kill_worker", str(tiny_llama_dir), str(out), "4"],
        cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = latest_checkpoint(out)
    assert last is not None and last.name == "checkpoint-4"

    full_model = _model(tiny_llama_dir)
    full = Trainer(full_model, "a", _rows(10), _collate, HP_RESUME, tmp_path / "full").train()
    resumed_model = _model(tiny_llama_dir)
    rest = Trainer(resumed_model, "a", _rows(10), _collate, HP_RESUME, out).train(resume_from=last)
    assert rest.global_step == 6
    torch.testing.assert_close(torch.tensor(rest.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    for key, value in _weights(full_model).items():
        torch.testing.assert_close(_weights(resumed_model)[key], value, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _rows(4)
    results = []
    for flag in (False, True):
        hp = Hyperparameters(max_steps=2, batch_size=4, learning_rate=1e-2, gradient_checkpointing=flag)
        am = _model(tiny_llama_dir)
        am.add_adapter("none", LoraConfig(r=2, target_modules=["k_proj"]))  # an inactive adapter stays frozen
        results.append((Trainer(am, "a", rows, _collate, hp, tmp_path / str(flag)).train(), _weights(am)))
    (plain, w_plain), (ckpt, w_ckpt) = results
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    for key, value in w_plain.items():
        torch.testing.assert_close(w_ckpt[key], value, rtol=1e-4, atol=1e-6)


def test_frozen_adapter_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from adapters_core import AdapterStateError

    am = _model(tiny_llama_dir)
    am.save_adapter(tmp_path / "a", "a")
    frozen = AdapterModel(load_model(tiny_llama_dir))
    frozen.load_adapter(tmp_path / "a", "a")  # is_trainable=False
    with pytest.raises(AdapterStateError, match="is_trainable=True"):
        Trainer(frozen, "a", _rows(2), _collate, Hyperparameters(max_steps=1), tmp_path / "run")
