"""Run by test_loop.py in a subprocess: trains, and SIGKILLs itself right after checkpoint ``argv[3]``."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from adapters_core.training.loop import NoCallbacks, Trainer
from tests.core.training.test_loop import HP_RESUME, _collate, _model, _rows


class KillAfterCheckpoint(NoCallbacks):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out_dir, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    Trainer(_model(model_dir), "a", _rows(10), _collate, HP_RESUME, out_dir, callbacks=KillAfterCheckpoint(kill_at)).train()
