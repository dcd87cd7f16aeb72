"""The training loop: one adapter of an :class:`AdapterModel`, through accelerate.

Resumable: a checkpoint (``checkpoint-<step>/``) holds the adapter in PEFT format, the optimizer and
scheduler state, the RNG states and the data position (epoch, next micro-batch). The data order of
epoch ``e`` is a permutation drawn from a generator seeded with ``seed + e``, so a resumed run sees
exactly the batches the uninterrupted run would have, and its loss curve is the same up to
floating-point noise.

Gradient accumulation weights each micro-batch by its number of loss tokens, so an optimizer step
is the token-mean loss over all of its micro-batches, whatever their sizes.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from adapters_core.errors import AdapterStateError, TrainingDiverged
from adapters_core.model import AdapterModel
from adapters_core.training.hyperparameters import Hyperparameters

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
Batch = dict[str, torch.Tensor]
Collate = Callable[[list[Any]], Batch]


@dataclass(frozen=True)
class Progress:
    """Reported after every optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    token_accuracy: float


class TrainingCallbacks(Protocol):
    """What the service plugs in: progress/eval/checkpoint reports and a cancellation check."""

    def on_progress(self, progress: Progress) -> None: ...
    def on_eval(self, result: EvalResult) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def should_cancel(self) -> bool: ...


class NoCallbacks:
    """Callbacks that do nothing (library use)."""

    def on_progress(self, progress: Progress) -> None:
        logger.info(
            "step %d/%d loss %.4f lr %.2e %.0f tok/s eta %.0fs",
            progress.step, progress.total_steps, progress.loss, progress.learning_rate,
            progress.tokens_per_second, progress.eta_seconds,
        )

    def on_eval(self, result: EvalResult) -> None:
        logger.info("eval at step %d: loss %.4f token accuracy %.3f", result.step, result.loss, result.token_accuracy)

    def on_checkpoint(self, step: int, path: Path) -> None:
        logger.info("checkpoint at step %d: %s", step, path)

    def should_cancel(self) -> bool:
        return False


@dataclass
class TrainResult:
    status: Literal["completed", "cancelled", "early_stopped"]
    global_step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    losses: list[float] = field(default_factory=list)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` with the highest step in ``directory`` (temp dirs ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    done = [p for p in d.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / STATE_NAME).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _label_tokens(batch: Batch) -> int:
    """Tokens that count in a causal-LM loss (labels are shifted by one inside the model)."""
    return int((batch["labels"][..., 1:] != -100).sum())


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def _resolve_precision(hp: Hyperparameters) -> str:
    if hp.mixed_precision != "auto":
        return hp.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    """Trains adapter ``adapter_name`` of ``model`` on ``train_rows`` (collated by ``collate``)."""

    def __init__(
        self,
        model: AdapterModel,
        adapter_name: str,
        train_rows: Sequence[Any],
        collate: Collate,
        hp: Hyperparameters,
        output_dir: str | Path,
        *,
        eval_rows: Sequence[Any] | None = None,
        callbacks: TrainingCallbacks | None = None,
    ) -> None:
        if not train_rows:
            raise ValueError("no training rows")
        self.model = model
        self.adapter_name = adapter_name
        self.train_rows = train_rows
        self.eval_rows = eval_rows
        self.collate = collate
        self.hp = hp
        self.output_dir = Path(output_dir)
        self.callbacks = callbacks or NoCallbacks()
        self.accelerator = Accelerator(
            mixed_precision=_resolve_precision(hp), gradient_accumulation_steps=1, cpu=not torch.cuda.is_available()
        )
        model.set_adapter(adapter_name)
        if hp.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        params = model.trainable_parameters()
        if not params:
            raise AdapterStateError(
                f"adapter {adapter_name!r} has no trainable parameters (load it with is_trainable=True)"
            )
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
        )
        self.micro_batches_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
        steps_per_epoch = math.ceil(self.micro_batches_per_epoch / hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or steps_per_epoch * hp.epochs
        self.scheduler = get_scheduler(
            hp.lr_scheduler,
            optimizer=self.optimizer,
            # HF Trainer's count for a ratio: rounded up (a short run still warms up)
            num_warmup_steps=math.ceil(hp.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.steps_per_epoch = steps_per_epoch
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        # the scheduler stays ours: accelerate would step it once per process per optimizer step
        self.prepared, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.position = _Position()

    def _enable_gradient_checkpointing(self) -> None:
        base = self.model.model
        enable = getattr(base, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ValueError("gradient_checkpointing: this base model does not support it")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ data
    def _micro_batches(self) -> Any:
        """Yield ``(epoch, index, batch, counts)`` from the current position on, epoch after epoch.

        ``batch_size`` is the global micro-batch: with several processes each takes every
        ``world``-th row of it. A process left without rows (a short last batch) gets a row with a
        zero loss weight (``counts`` False), so every process still joins the gradient all-reduce.
        """
        bs = self.hp.batch_size
        epoch, start = self.position.epoch, self.position.micro_batch
        while True:
            order = _epoch_order(len(self.train_rows), self.hp.seed, epoch)
            for i in range(start, self.micro_batches_per_epoch):
                global_rows = order[i * bs : (i + 1) * bs]
                mine = global_rows[self.rank :: self.world]
                counts = bool(mine)
                rows = [self.train_rows[j] for j in (mine or global_rows[:1])]
                yield epoch, i, self.collate(rows), counts
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (a temp dir renamed into place; main process only)."""
        step = self.position.step
        final = self.output_dir / f"checkpoint-{step}"
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return final
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_adapter(tmp / "adapter", self.adapter_name)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():  # (dropout on a GPU draws from the CUDA generators)
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_NAME).write_text(json.dumps(vars(self.position), indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        self.callbacks.on_checkpoint(step, final)
        return final

    def _prune_checkpoints(self) -> None:
        """Delete all but the newest ``save_total_limit`` complete checkpoints."""
        limit = self.hp.save_total_limit
        if limit is None:
            return
        done = sorted(
            (p for p in self.output_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / STATE_NAME).exists()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in done[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from ``path``."""
        d = Path(path)
        self.model.load_adapter_weights(d / "adapter", self.adapter_name)
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        rng = torch.load(d / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.position = _Position(**json.loads((d / STATE_NAME).read_text()))
        logger.info("resumed from %s at step %d", d, self.position.step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        assert self.eval_rows is not None
        self.prepared.eval()
        loss_sum, correct, tokens = 0.0, 0, 0
        bs = self.hp.batch_size
        for i in range(0, len(self.eval_rows), bs):
            batch = {k: v.to(self.accelerator.device) for k, v in self.collate(list(self.eval_rows[i : i + bs])).items()}
            out = self.prepared(**batch)
            n = _label_tokens(batch)
            if n == 0:  # no token in the loss: its mean loss is NaN (0/0), and it adds nothing
                continue
            loss_sum += float(out.loss) * n
            labels = batch["labels"][..., 1:]
            mask = labels != -100
            pred = out.logits[..., :-1, :].argmax(-1)
            correct += int(((pred == labels) & mask).sum())
            tokens += n
        self.prepared.train()
        return EvalResult(self.position.step, loss_sum / max(tokens, 1), correct / max(tokens, 1))

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            torch.manual_seed(self.hp.seed)
            random.seed(self.hp.seed)
        result = TrainResult("completed", self.position.step, self.total_steps, losses=self.position.losses)
        if self.position.best_step is not None and (self.output_dir / "best").is_dir():  # (a resumed run's)
            result.best_checkpoint = self.output_dir / "best"
        self.prepared.train()
        accum = self.hp.gradient_accumulation_steps
        batches = self._micro_batches()
        started, tokens_seen = time.perf_counter(), 0
        start_step = self.position.step
        while self.position.step < self.total_steps:
            if self.callbacks.should_cancel():
                result.status = "cancelled"
                break
            group: list[Any] = []  # up to `accum` micro-batches, never past an epoch's end (its last step may be shorter)
            while len(group) < accum:
                group.append(next(batches))
                if group[-1][1] + 1 == self.micro_batches_per_epoch:
                    break
            local_tokens = sum(_label_tokens(b) for _, _, b, counts in group if counts)
            step_tokens = self._sum_over_processes(float(local_tokens))
            step_loss = 0.0
            for _, _, batch, counts in group:
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                # DDP averages gradients over processes: scale so the step is the global token mean
                weight = (_label_tokens(batch) if counts else 0) / max(step_tokens, 1.0) * self.world
                out = self.prepared(**batch)
                # a micro-batch with no token in the loss has a NaN mean loss (0/0): it adds nothing, and
                # still goes through backward, so every process joins the gradient all-reduce
                loss = out.loss * weight if _label_tokens(batch) else out.logits.sum() * 0.0
                self.accelerator.backward(loss)
                step_loss += float(loss.detach()) / self.world
                tokens_seen += int(batch["input_ids"].numel()) if counts else 0
            step_loss = self._sum_over_processes(step_loss)
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"the training loss is {step_loss} at step {self.position.step + 1}: the run diverged "
                    "(lower learning_rate, or set max_grad_norm); no adapter was saved"
                )
            if self.hp.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.model.trainable_parameters(), self.hp.max_grad_norm)
            learning_rate = float(self.scheduler.get_last_lr()[0])  # the rate this step uses (what HF logs)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            epoch, index, _, _ = group[-1]
            pos = self.position
            pos.step += 1
            pos.epoch, pos.micro_batch = (epoch, index + 1) if index + 1 < self.micro_batches_per_epoch else (epoch + 1, 0)
            pos.losses.append(step_loss)
            elapsed = time.perf_counter() - started
            done = pos.step - start_step
            self.callbacks.on_progress(
                Progress(
                    step=pos.step, total_steps=self.total_steps, epoch=pos.epoch, loss=step_loss,
                    learning_rate=learning_rate,
                    tokens_per_second=tokens_seen / max(elapsed, 1e-9),
                    eta_seconds=elapsed / done * (self.total_steps - pos.step),
                )
            )
            if self._should(self.hp.eval_steps, pos.step) and self.eval_rows and self._evaluate_and_maybe_stop(result):
                result.status = "early_stopped"
                break
            if self._should(self.hp.save_steps, pos.step) and pos.step < self.total_steps:
                result.last_checkpoint = self.save_checkpoint()
        result.global_step = self.position.step
        result.losses = self.position.losses
        return result

    def close(self) -> bool:
        """Tear a distributed run down; call it once, last, in a script run by a launcher (the trainer is
        unusable afterwards). Returns whether the DDP wrapper was freed (always True in one process,
        where there is nothing to tear down).

        The order matters. Every rank waits for the others; the DDP wrapper and accelerate's references
        to it are freed while the process group is still registered; then the group is destroyed, and
        torch joins its gloo threads with the GIL released. Freed the other way round, the wrapper's
        reducer destroys the group and joins those threads holding the GIL, and a thread still dropping
        a collective's tensor waits for the GIL forever: the rank hangs at exit (seen in CI). A group
        left alive until the interpreter exits can abort the rank instead."""
        if self.world == 1:
            return True
        self.accelerator.wait_for_everyone()
        wrapper = weakref.ref(self.prepared)
        self.prepared = self.model
        self.accelerator.free_memory()
        gc.collect()
        freed = wrapper() is None
        if not freed:
            logger.warning("the DDP-wrapped model is still referenced outside the trainer; destroying the "
                           "process group now can hang this process at exit")
        self.accelerator.end_training()
        return freed

    def _sum_over_processes(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def _should(self, every: int | None, step: int) -> bool:
        if every is None:
            return step % self.steps_per_epoch == 0 or step == self.total_steps
        return step % every == 0

    def _evaluate_and_maybe_stop(self, result: TrainResult) -> bool:
        ev = self.evaluate()
        result.evals.append(ev)
        self.callbacks.on_eval(ev)
        pos = self.position
        if pos.best_eval_loss is None or ev.loss < pos.best_eval_loss:
            pos.best_eval_loss, pos.best_step, pos.bad_evals = ev.loss, pos.step, 0
            best = self.output_dir / "best"
            self.model.save_adapter(best, self.adapter_name)
            result.best_checkpoint = best
            return False
        pos.bad_evals += 1
        patience = self.hp.early_stopping_patience
        return patience is not None and pos.bad_evals >= patience
