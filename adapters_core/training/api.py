"""One call from JSONL data to a trained adapter: validate → tokenise → pack (or pad) → train → save.

The Celery training task is a thin wrapper over :func:`train_adapter`.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_core.config import AdapterConfig
from adapters_core.errors import ConfigError
from adapters_core.methods.lora.convert import rewrites_base
from adapters_core.model import AdapterModel
from adapters_core.training.data import FALLBACK_CHAT_TEMPLATE, ValidationReport, validate_or_raise
from adapters_core.training.examples import Example, TokenizedExample
from adapters_core.training.hyperparameters import Hyperparameters
from adapters_core.training.loop import Trainer, TrainingCallbacks, TrainResult
from adapters_core.training.packing import collate_packed, collate_padded, pack, supports_packing
from adapters_core.training.tokenize import IGNORE_INDEX, tokenize_dataset

logger = logging.getLogger(__name__)

DataSource = str | Path | bytes | Sequence[str]


@dataclass
class TrainOutcome:
    """What a finished (or stopped) run produced."""

    result: TrainResult
    adapter_dir: Path
    train_report: ValidationReport
    eval_report: ValidationReport | None


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if not 0 < fraction < 1:
        raise ConfigError(f"validation_split must be in (0, 1), got {fraction!r}", field="validation_split")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise ConfigError(f"validation_split {fraction!r} of {len(examples)} examples leaves none to train on",
                          field="validation_split")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _rows(
    examples: list[Example], tokenizer: Any, hp: Hyperparameters
) -> tuple[list[Any], Any]:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    tokenized: list[TokenizedExample] = tokenize_dataset(
        examples, tokenizer, max_seq_len=hp.max_seq_len, train_on_inputs=hp.train_on_inputs, chat_template=template
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if hp.packing:
        return list(pack(tokenized, hp.max_seq_len)), functools.partial(collate_packed, pad_token_id=pad)
    return list(tokenized), functools.partial(collate_padded, pad_token_id=pad)


INITIAL_ADAPTER_DIR = "initial_adapter"  # under output_dir: a base-rewriting init's adapter before training


def _in_loss(row: Any) -> bool:
    """Whether a tokenized example or packed row has a token in the loss (past the first: labels shift)."""
    return any(label != IGNORE_INDEX for label in row.labels[1:])


def train_adapter(
    model: AdapterModel,
    tokenizer: Any,
    adapter_name: str,
    config: AdapterConfig,
    train_data: DataSource,
    hp: Hyperparameters,
    output_dir: str | Path,
    *,
    eval_data: DataSource | None = None,
    validation_split: float | None = None,
    callbacks: TrainingCallbacks | None = None,
    resume_from: str | Path | None = None,
) -> TrainOutcome:
    """Train a new adapter ``adapter_name`` (from ``config``) on ``train_data`` and save it.

    Data problems raise :class:`~adapters_core.training.data.DataError` (every problem, by line)
    before any training. The adapter is written in PEFT format to ``output_dir/adapter``; an initialisation
    that rewrote the base weights (PiSSA, OLoRA) also leaves the adapter as it started in
    ``output_dir/initial_adapter``, from which :func:`adapters_core.methods.lora.convert.convert_saved` makes
    it a plain LoRA of the original base.
    """
    examples, report = validate_or_raise(train_data, tokenizer, hp.max_seq_len)
    eval_examples: list[Example] | None = None
    eval_report = None
    if eval_data is not None:
        eval_examples, eval_report = validate_or_raise(eval_data, tokenizer, hp.max_seq_len)
    elif validation_split is not None:
        examples, eval_examples = _split(examples, validation_split, hp.seed)
    if hp.packing and not supports_packing(model):
        raise ConfigError(
            "packing: this model cannot keep packed examples from attending to each other; set packing=false",
            field="packing",
        )
    out = Path(output_dir)
    if adapter_name not in model.adapters:
        torch.manual_seed(hp.seed)  # the seed sets the adapter's initial weights too (as it does in the Trainer)
        model.add_adapter(adapter_name, config)
        if rewrites_base(config):  # the adapter as PiSSA / OLoRA left it: what a conversion to plain LoRA needs
            model.save_adapter(out / INITIAL_ADAPTER_DIR, adapter_name)
    rows, collate = _rows(examples, tokenizer, hp)
    eval_rows = _rows(eval_examples, tokenizer, hp)[0] if eval_examples else None
    for which, kept in (("training", rows), ("validation", eval_rows)):
        if kept is not None and not any(_in_loss(row) for row in kept):  # the loss would be 0/0
            raise ConfigError(f"no {which} example keeps a token in the loss within max_seq_len={hp.max_seq_len} "
                              "(raise max_seq_len, or check the examples' weights)", field="max_seq_len")
    trainer = Trainer(model, adapter_name, rows, collate, hp, out / "checkpoints", eval_rows=eval_rows, callbacks=callbacks)
    result = trainer.train(resume_from=resume_from)
    adapter_dir = out / "adapter"
    if trainer.accelerator.is_main_process:
        model.save_adapter(adapter_dir, adapter_name)
    logger.info("training %s: %s after %d steps; adapter in %s", adapter_name, result.status, result.global_step, adapter_dir)
    return TrainOutcome(result, adapter_dir, report, eval_report)
