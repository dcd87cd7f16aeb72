"""Run by ``torch.distributed.run`` from test_loop.py: a short LoRA run whose results rank 0 saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapters_core import AdapterModel, LoraConfig
from adapters_core.training.hyperparameters import Hyperparameters
from adapters_core.training.loop import Trainer


def rows(n: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (length,), generator=g).tolist() for _ in range(n)]


def collate(batch: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(batch)
    return {"input_ids": ids, "labels": ids.clone()}


def run(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    am = AdapterModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    torch.manual_seed(0)
    am.add_adapter("a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    hp = Hyperparameters(max_steps=4, batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2, seed=5)
    trainer = Trainer(am, "a", rows(11), collate, hp, Path(out_dir) / "run")
    result = trainer.train()
    main, world = trainer.accelerator.is_main_process, trainer.world
    if main:
        am.save_adapter(Path(out_dir) / "adapter", "a")
    # the process group torn down in the order that cannot hang or abort a rank at exit
    freed = trainer.close()
    if main:
        (Path(out_dir) / "result.json").write_text(
            json.dumps({"losses": result.losses, "world": world, "steps": result.global_step, "ddp_freed": freed})
        )


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
