"""Shared fixtures: tiny seeded models built once per session in a temp dir (no downloads)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the fused GPU kernel (Triton) runs on CPU tensors through Triton's interpreter, which must be chosen
# before Triton is first imported (tests/core/test_gpu_bgmv.py, the "triton" paths of test_slotted.py)
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama-style model (hidden 32, 2 layers, 4 heads, 2 kv heads) saved with save_pretrained."""
    from adapters_core.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GPT-2-style model (Conv1D layers, n_embd 32, 2 layers) saved with save_pretrained."""
    from adapters_core.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def model_dirs(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}


def load_model(path: Path):
    """A fresh float32 model from ``path`` in eval mode, through ``from_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
