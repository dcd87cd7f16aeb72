"""Benchmark AdapterForge's training loop (``adapters_core.training``) against HF ``peft`` on CPU.

One run builds a seeded Llama-style model locally (hidden 256, 4 layers, 8 heads / 4 kv heads,
intermediate 688, float32), one LoRA initialisation (r=16, ``lora_alpha`` 32, ``all-linear``, dropout 0,
created by ``peft`` and saved in PEFT format, so both sides start from the same weights) and a seeded
synthetic chat dataset with a long-tailed length distribution (most examples ~20-60 tokens, ~10%
~400-500 tokens), and measures:

a. training throughput in padding mode: non-pad tokens per second of our ``Trainer`` (``packing=False``,
   ``collate_padded``) vs ``peft.get_peft_model`` + a plain ``torch.optim.AdamW`` loop fed the very same
   padded batches in the same order, same number of optimizer steps, after warm-up steps
   (target: ours >= 1.0x)
b. one epoch over the dataset: ``train_adapter`` with packing (``max_seq_len`` 512) vs ``peft`` +
   ``transformers.Trainer`` with a padding collator (``DataCollatorForSeq2Seq``), same per-device batch
   size, learning rate, scheduler, seed and LoRA config (target: ours >= 2x faster), and the quality of
   the two resulting adapters, evaluated by one shared function (token-mean loss over the assistant
   tokens) on a held-out set and on the training set (target: ours within 2% of theirs)

Rounds of (a) alternate ours / peft (order rotated) and the ratio is the median of per-round ratios.
Exit status is 0 unless ``--strict`` is given and a target is missed.

    python bench/bench_training.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _runner import add_common_arguments, run_bench

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from adapters_core import AdapterModel, LoraConfig  # noqa: E402
from adapters_core.tiny_models import TinyLlamaSpec, build_tiny_llama  # noqa: E402
from adapters_core.training.api import train_adapter  # noqa: E402
from adapters_core.training.data import validate_or_raise  # noqa: E402
from adapters_core.training.examples import TokenizedExample  # noqa: E402
from adapters_core.training.hyperparameters import Hyperparameters  # noqa: E402
from adapters_core.training.loop import Trainer, _epoch_order  # noqa: E402
from adapters_core.training.packing import collate_padded, pack  # noqa: E402
from adapters_core.training.tokenize import tokenize_dataset  # noqa: E402

logger = logging.getLogger("bench_training")

RANK, ALPHA = 16, 32
BATCH = 8
MAX_SEQ_LEN = 512
LR = 1e-3
SCHEDULER = "cosine"
SEED = 42
SPEC = TinyLlamaSpec(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    max_position_embeddings=MAX_SEQ_LEN,
)

TARGETS = {
    "padded_throughput_ratio": 1.0,  # ours tok/s / peft tok/s >= this
    "epoch_speedup": 2.0,  # HF Trainer epoch time / ours >= this
    "loss_rel_diff": 0.02,  # (ours eval loss - theirs) / theirs <= this
}

# Vocabulary of the synthetic conversations: words the tiny tokenizer's BPE was trained on.
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "adapters",
    "can",
    "be",
    "merged",
    "into",
    "base",
    "weights",
    "or",
    "served",
    "side",
    "by",
    "one",
    "batch",
    "hello",
    "how",
    "help",
    "you",
    "today",
    "what",
    "is",
    "two",
    "plus",
    "four",
    "rain",
    "in",
    "spain",
    "stays",
    "mainly",
    "plain",
    "summarise",
    "this",
    "text",
    "here",
    "summary",
    "assistant",
    "user",
    "system",
    "helpful",
    "model",
    "train",
    "token",
    "loss",
]
_TOPICS = ["fox", "rain", "adapters", "numbers", "greeting", "summary"]


class _Quiet:
    """Training callbacks that only keep the per-step losses (no logging inside the timed loop)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_progress(self, progress: Any) -> None:
        self.losses.append(progress.loss)

    def on_eval(self, result: Any) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def should_cancel(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------- data
def synthetic_chat(n: int, seed: int, tokenizer: Any) -> list[str]:
    """``n`` seeded chat JSONL lines; ~90% short (~20-60 tokens), ~10% long (~400-500 tokens).

    Each answer is a deterministic-ish function of the question's topic (a fixed phrase per topic,
    repeated, plus seeded noise words), so there is something to learn and the loss falls.
    """
    rng = random.Random(seed)
    phrases = {t: " ".join(random.Random(i).choices(_WORDS, k=6)) for i, t in enumerate(_TOPICS)}

    def n_tok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    overhead = n_tok("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")
    lines = []
    for _ in range(n):
        target = rng.randint(400, 500) if rng.random() < 0.1 else rng.randint(20, 60)
        topic = rng.choice(_TOPICS)
        question = f"tell me about {topic}"
        budget = target - overhead - n_tok(question)
        words: list[str] = []
        while True:
            chunk = phrases[topic] if rng.random() < 0.7 else rng.choice(_WORDS)
            if n_tok(" ".join([*words, chunk])) > budget:
                break
            words.append(chunk)
            if len(words) > 1000:
                break
        answer = " ".join(words) or topic
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        )
    return lines


def tokenized(lines: list[str], tokenizer: Any) -> list[TokenizedExample]:
    examples, _ = validate_or_raise(lines, tokenizer, MAX_SEQ_LEN)
    return tokenize_dataset(examples, tokenizer, max_seq_len=MAX_SEQ_LEN)


# ---------------------------------------------------------------------------------------- set-up
def load_base(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_config() -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def make_init_adapter(model_dir: Path, out: Path) -> None:
    """peft's default LoRA init (kaiming A, zero B), seeded, saved in PEFT format: both sides start here."""
    from peft import get_peft_model

    torch.manual_seed(SEED)
    get_peft_model(load_base(model_dir), peft_config()).save_pretrained(out)


def ours_model(model_dir: Path, init_dir: Path, name: str) -> AdapterModel:
    am = AdapterModel(load_base(model_dir))
    am.load_adapter(init_dir, name, is_trainable=True)
    am.set_adapter(name)
    return am


def peft_model(model_dir: Path, init_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_dir), init_dir, is_trainable=True)


def n_tokens_of(rows: list[TokenizedExample]) -> int:
    return sum(len(r.input_ids) for r in rows)


def hp(**kw: Any) -> Hyperparameters:
    base = dict(
        epochs=1,
        learning_rate=LR,
        lr_scheduler=SCHEDULER,
        warmup_ratio=0.0,
        weight_decay=0.0,
        batch_size=BATCH,
        max_grad_norm=1.0,
        max_seq_len=MAX_SEQ_LEN,
        mixed_precision="no",
        seed=SEED,
    )
    base.update(kw)
    return Hyperparameters(**base)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: list[TokenizedExample], pad: int) -> float:
    """Shared evaluation: token-mean causal-LM loss over every label token of ``rows`` (padded batches of 8)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), BATCH):
        batch = collate_padded(rows[i : i + BATCH], pad)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        labels = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(lp)
        n += int((labels != -100).sum())
    model.train(was)
    return total / n


def machine_info() -> dict[str, Any]:
    import peft
    import transformers

    return {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# ---------------------------------------------------------------------------------------- (a)
def ours_padded_steps(
    am: AdapterModel, rows: list[TokenizedExample], pad: int, steps: int, work: Path
) -> float:
    collate = functools.partial(collate_padded, pad_token_id=pad)
    trainer = Trainer(
        am, "a", rows, collate, hp(packing=False, max_steps=steps), work / "ckpt-a", callbacks=_Quiet()
    )
    gc.collect()
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def peft_padded_steps(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = get_scheduler(SCHEDULER, optimizer=opt, num_warmup_steps=0, num_training_steps=len(batches))
    model.train()
    gc.collect()
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def padded_batches(rows: list[TokenizedExample], pad: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """The batches our Trainer draws for its first ``steps`` steps (epoch-0 permutation, seed ``SEED``)."""
    out = []
    epoch = 0
    while len(out) < steps:
        order = _epoch_order(len(rows), SEED, epoch)
        for i in range(math.ceil(len(rows) / BATCH)):
            if len(out) == steps:
                break
            out.append(collate_padded([rows[j] for j in order[i * BATCH : (i + 1) * BATCH]], pad))
        epoch += 1
    return out


# ---------------------------------------------------------------------------------------- benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    quick = args.quick
    n_train = 96 if quick else 256
    n_eval = 32 if quick else 64
    rounds = args.rounds or (1 if quick else 3)
    rounds_b = 1 if quick else 2
    warm_steps = 1 if quick else 2

    tmp = tempfile.TemporaryDirectory(prefix="bench_training_")
    work = Path(tmp.name)
    model_dir, init_dir = work / "model", work / "init"
    build_tiny_llama(model_dir, SPEC, seed=0)
    make_init_adapter(model_dir, init_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id

    lines = synthetic_chat(n_train, SEED, tok)
    eval_lines = synthetic_chat(n_eval, SEED + 1, tok)
    t0 = time.perf_counter()
    rows = tokenized(lines, tok)
    prep_s = time.perf_counter() - t0
    eval_rows = tokenized(eval_lines, tok)
    lengths = sorted(len(r.input_ids) for r in rows)
    packed = pack(rows, MAX_SEQ_LEN)
    n_tokens = sum(lengths)
    steps = math.ceil(len(rows) / BATCH)  # one epoch of padded batches
    # Packing changes what a batch is: a packed row holds many examples. For the loss comparison to
    # mean anything both runs must see the same number of training tokens per optimizer step, so the
    # packed run takes as many rows as hold the tokens of BATCH average examples.
    packed_batch = max(1, round(BATCH * n_tokens_of(rows) / len(rows) / MAX_SEQ_LEN))
    batches = padded_batches(rows, pad, steps)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(int(b["attention_mask"].numel()) for b in batches)
    logger.info(
        "data: %d examples, %d tokens (median %d, max %d, %d over 300), %d packed rows; padded epoch %d steps, "
        "%.0f%% of padded tokens are padding",
        len(rows),
        n_tokens,
        lengths[len(lengths) // 2],
        lengths[-1],
        sum(n > 300 for n in lengths),
        len(packed),
        steps,
        100 * (1 - real_tokens / padded_tokens),
    )

    results: dict[str, Any] = {
        "machine": machine_info(),
        "setup": {
            "model": {**SPEC.__dict__, "vocab_size": len(tok), "dtype": "float32"},
            "lora": {"r": RANK, "lora_alpha": ALPHA, "target_modules": "all-linear", "lora_dropout": 0.0},
            "batch_size": BATCH,
            "packed_batch_size": packed_batch,
            "learning_rate": LR,
            "scheduler": SCHEDULER,
            "warmup": 0,
            "seed": SEED,
            "max_grad_norm": 1.0,
            "max_seq_len": MAX_SEQ_LEN,
            "train_examples": len(rows),
            "eval_examples": len(eval_rows),
            "train_tokens": n_tokens,
            "median_len": lengths[len(lengths) // 2],
            "max_len": lengths[-1],
            "long_examples": sum(n > 300 for n in lengths),
            "packed_rows": len(packed),
            "padded_steps": steps,
            "padding_fraction": 1 - real_tokens / padded_tokens,
            "rounds": rounds,
            "quick": quick,
        },
    }

    # ---- (a) padded throughput, same batches, same steps; rounds alternate ours / peft
    logger.info("(a) padded throughput: %d rounds x %d steps per side", rounds, steps)
    am = ours_model(model_dir, init_dir, "a")
    pm = peft_model(model_dir, init_dir)
    ours_padded_steps(am, rows, pad, warm_steps, work)  # warm-up
    peft_padded_steps(pm, batches[:warm_steps])
    peft_padded_steps(am, batches[:warm_steps])
    t_ours, t_raw, t_peft = [], [], []
    kinds = ["ours", "raw", "peft"]
    for r in range(rounds):
        for k in kinds[r % 3 :] + kinds[: r % 3]:
            if k == "ours":
                t_ours.append(ours_padded_steps(am, rows, pad, steps, work))
            elif (
                k == "raw"
            ):  # our AdapterModel in the same plain loop as peft: engine cost without our Trainer
                t_raw.append(peft_padded_steps(am, batches))
            else:
                t_peft.append(peft_padded_steps(pm, batches))
        logger.info(
            "  round %d: ours Trainer %.2fs, ours model in plain loop %.2fs, peft %.2fs",
            r,
            t_ours[-1],
            t_raw[-1],
            t_peft[-1],
        )
    del am, pm
    gc.collect()
    results["padded"] = {
        "steps": steps,
        "non_pad_tokens_per_epoch": real_tokens,
        "seconds": {"ours": t_ours, "ours_model_plain_loop": t_raw, "peft": t_peft},
        "tokens_per_s": {
            "ours": real_tokens / statistics.median(t_ours),
            "ours_model_plain_loop": real_tokens / statistics.median(t_raw),
            "peft": real_tokens / statistics.median(t_peft),
        },
        "ratio": statistics.median(p / o for o, p in zip(t_ours, t_peft, strict=True)),
        "ratio_ours_model_plain_loop": statistics.median(p / o for o, p in zip(t_raw, t_peft, strict=True)),
    }

    # ---- (b) one epoch: ours packed (train_adapter) vs peft + transformers.Trainer padded
    logger.info("(b) one epoch: ours train_adapter(packing=True) vs HF Trainer (padded)")
    ds = [
        {"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels} for r in rows
    ]
    targs = TrainingArguments(
        output_dir=str(work / "hf-b"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type=SCHEDULER,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        optim="adamw_torch",
        train_sampling_strategy="random",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    ours_times, hf_times = [], []
    for r in range(rounds_b):
        for k in ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]:
            gc.collect()
            if k == "ours":
                am = ours_model(model_dir, init_dir, "b")
                cb = _Quiet()
                t0 = time.perf_counter()
                outcome = train_adapter(
                    am,
                    tok,
                    "b",
                    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"),
                    lines,
                    hp(packing=True, batch_size=packed_batch),
                    work / f"ours-b{r}",
                    callbacks=cb,
                )
                ours_times.append(time.perf_counter() - t0)
                ours_steps = outcome.result.global_step
                logger.info("  ours: %.2fs, %d steps", ours_times[-1], ours_steps)
            else:
                pm = peft_model(model_dir, init_dir)
                t0 = time.perf_counter()
                hf = HFTrainer(model=pm, args=targs, train_dataset=ds, data_collator=collator)
                hf.remove_callback(
                    PrinterCallback
                )  # no per-step printing (logging_steps=1 keeps the loss history)
                hf.train()
                hf_times.append(time.perf_counter() - t0)
                hf_steps = hf.state.global_step
                hf_losses = [h["loss"] for h in hf.state.log_history if "loss" in h]
                logger.info("  HF Trainer: %.2fs, %d steps", hf_times[-1], hf_steps)
    ours_epoch, hf_epoch = min(ours_times), min(hf_times)

    # info: our Trainer in padding mode, one epoch from the same init (as many steps as HF's)
    ap = ours_model(model_dir, init_dir, "p")
    t0 = time.perf_counter()
    Trainer(
        ap,
        "p",
        rows,
        functools.partial(collate_padded, pad_token_id=pad),
        hp(packing=False),
        work / "ours-p",
        callbacks=_Quiet(),
    ).train()
    ours_padded_epoch = time.perf_counter() - t0
    ours_padded_eval = eval_loss(ap, eval_rows, pad)
    del ap

    # shared evaluation of both final adapters
    ours_eval = eval_loss(am, eval_rows, pad)
    hf_eval = eval_loss(pm, eval_rows, pad)
    ours_train_eval = eval_loss(am, rows, pad)
    hf_train_eval = eval_loss(pm, rows, pad)
    with am.disable_adapters():
        init_eval = eval_loss(
            am, eval_rows, pad
        )  # LoRA B starts at zero: the initial adapter is the base model
    results["epoch"] = {
        "seconds": {"ours": ours_epoch, "hf_trainer": hf_epoch},
        "seconds_all": {"ours": ours_times, "hf_trainer": hf_times},
        "ours_padded_epoch": {"seconds": ours_padded_epoch, "eval_loss_heldout": ours_padded_eval},
        "ours_data_prep_s": prep_s,
        "optimizer_steps": {"ours": ours_steps, "hf_trainer": hf_steps},
        "speedup": hf_epoch / ours_epoch,
        "eval_loss_heldout": {"ours": ours_eval, "hf_trainer": hf_eval, "initial": init_eval},
        "eval_loss_train": {"ours": ours_train_eval, "hf_trainer": hf_train_eval},
        "loss_rel_diff": (ours_eval - hf_eval) / hf_eval,
        "train_loss_last_step": {
            "ours": cb.losses[-1] if cb.losses else None,
            "hf_trainer": hf_losses[-1] if hf_losses else None,
        },
    }
    results["pass"] = {
        "padded_throughput_ratio": results["padded"]["ratio"] >= TARGETS["padded_throughput_ratio"],
        "epoch_speedup": results["epoch"]["speedup"] >= TARGETS["epoch_speedup"],
        "loss_rel_diff": results["epoch"]["loss_rel_diff"] <= TARGETS["loss_rel_diff"],
    }
    results["targets"] = TARGETS
    tmp.cleanup()
    return results


# ---------------------------------------------------------------------------------------- report
def report(r: dict[str, Any]) -> str:
    m, s, p, e = r["machine"], r["setup"], r["padded"], r["epoch"]
    ok = {k: "PASS" if v else "FAIL" for k, v in r["pass"].items()}
    rows = [
        ("metric", "ours", "HF peft", "target (ours)", "result"),
        (
            "a. padded train thrpt (non-pad tok/s)",
            f"{p['tokens_per_s']['ours']:.0f}",
            f"{p['tokens_per_s']['peft']:.0f}",
            f">= {TARGETS['padded_throughput_ratio']:.1f}x",
            f"{ok['padded_throughput_ratio']} ({p['ratio']:.2f}x)",
        ),
        (
            "b. one epoch, ours packed vs HF Trainer",
            f"{e['seconds']['ours']:.1f} s",
            f"{e['seconds']['hf_trainer']:.1f} s",
            f">= {TARGETS['epoch_speedup']:.0f}x faster",
            f"{ok['epoch_speedup']} ({e['speedup']:.2f}x)",
        ),
        (
            "b. held-out token-mean loss after epoch",
            f"{e['eval_loss_heldout']['ours']:.4f}",
            f"{e['eval_loss_heldout']['hf_trainer']:.4f}",
            f"within {TARGETS['loss_rel_diff'] * 100:.0f}%",
            f"{ok['loss_rel_diff']} ({e['loss_rel_diff'] * 100:+.1f}%)",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def fmt(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join(
        [
            f"Training benchmark ({m['date']}): torch {m['torch']}, {m['torch_threads']} threads, {m['cpu_count']} CPUs, "
            f"transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}",
            f"model: Llama hidden {SPEC.hidden_size}, {SPEC.num_hidden_layers} layers, float32; LoRA r={RANK} "
            f"all-linear; batch {BATCH}, lr {LR:g} {SCHEDULER}, no warm-up, clip 1.0, seed {SEED}"
            + (" (--quick)" if s["quick"] else ""),
            f"data: {s['train_examples']} chat examples, {s['train_tokens']} tokens (median {s['median_len']}, "
            f"max {s['max_len']}, {s['long_examples']} over 300), {s['packed_rows']} packed rows of <= {MAX_SEQ_LEN}; "
            f"{s['padding_fraction'] * 100:.0f}% of padded-batch tokens are padding; held-out {s['eval_examples']}",
            "",
            fmt(rows[0]),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(fmt(row) for row in rows[1:]),
            "",
            "(a) {} steps x {} rounds, seconds per epoch: ours {}, peft {}".format(
                p["steps"],
                s["rounds"],
                ", ".join(f"{t:.2f}" for t in p["seconds"]["ours"]),
                ", ".join(f"{t:.2f}" for t in p["seconds"]["peft"]),
            ),
            "(a) ours model in the same plain loop as peft (no Trainer): {:.0f} tok/s, {:.2f}x peft".format(
                p["tokens_per_s"]["ours_model_plain_loop"], p["ratio_ours_model_plain_loop"]
            ),
            "(b) epoch seconds, min of runs: ours {} / HF {}; our Trainer in padding mode, one epoch: {:.1f} s, "
            "held-out loss {:.4f}".format(
                ", ".join(f"{t:.1f}" for t in e["seconds_all"]["ours"]),
                ", ".join(f"{t:.1f}" for t in e["seconds_all"]["hf_trainer"]),
                e["ours_padded_epoch"]["seconds"],
                e["ours_padded_epoch"]["eval_loss_heldout"],
            ),
            "(b) optimizer steps: ours {} (packed), HF Trainer {} (padded); ours includes validation + "
            "tokenisation ({:.2f} s) + adapter save, HF gets pre-tokenised rows".format(
                e["optimizer_steps"]["ours"], e["optimizer_steps"]["hf_trainer"], e["ours_data_prep_s"]
            ),
            "(b) token-mean loss, shared eval: held-out ours {:.4f} / HF {:.4f} (before training {:.4f}); "
            "training set ours {:.4f} / HF {:.4f}".format(
                e["eval_loss_heldout"]["ours"],
                e["eval_loss_heldout"]["hf_trainer"],
                e["eval_loss_heldout"]["initial"],
                e["eval_loss_train"]["ours"],
                e["eval_loss_train"]["hf_trainer"],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data set, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of (a) (default 3, --quick 1)")
    add_common_arguments(parser)
    return run_bench(parser.parse_args(argv), run, report, quiet_loggers=("adapters_core", "accelerate", "transformers", "peft"))


if __name__ == "__main__":
    sys.exit(main())
