"""Initial values of fresh LoRA weights, one function per ``init_lora_weights`` value.

Each returns ``(A, B)`` in ``nn.Linear`` layout and, for the methods that move the principal
components out of the base weight (PiSSA, OLoRA), the new base weight ``W - s·B·A``.

* ``True``: A ~ Kaiming-uniform(a=√5) (``nn.Linear``'s default), B = 0, so ΔW = 0 (Hu et al.).
  For embeddings the roles swap: A = 0, B ~ N(0, 1).
* ``"gaussian"``: A ~ N(0, 1/r), B = 0.
* ``False``: both random (A and B as ``nn.Linear`` would initialise them): a non-identity adapter,
  useful for tests.
* ``"pissa"`` / ``"pissa_niter_<n>"``: W = U S Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s); base
  becomes W − s·B·A (Meng et al., 2024, https://arxiv.org/abs/2404.02948).
* ``"olora"``: W = Q R; A = R[:r], B = Q[:, :r]; base becomes W − s·B·A (Büyükakyüz, 2024).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _kaiming(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def default_init(
    r: int, n_in: int, n_out: int, *, embedding: bool, mode: bool | str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, n_in)`` and ``B (n_out, r)`` for ``init_lora_weights`` True / False / "gaussian"."""
    if mode is False:
        if embedding:
            return torch.randn((r, n_in), dtype=dtype, device=device), torch.randn((n_out, r), dtype=dtype, device=device)
        return _kaiming((r, n_in), dtype, device), _kaiming((n_out, r), dtype, device)
    if embedding:
        a = torch.zeros((r, n_in), dtype=dtype, device=device)
        b = torch.empty((n_out, r), dtype=dtype, device=device)
        nn.init.normal_(b)
        return a, b
    if mode is True:
        a = _kaiming((r, n_in), dtype, device)
    elif mode == "gaussian":
        a = torch.empty((r, n_in), dtype=dtype, device=device)
        nn.init.normal_(a, std=1.0 / r)
    else:
        raise ValueError(f"not a default init mode: {mode!r}")
    return a, torch.zeros((n_out, r), dtype=dtype, device=device)


def pissa_init(
    weight: torch.Tensor, r: int, scaling: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: principal singular components of ``weight (out, in)``; returns ``A, B, W - s·B·A``."""
    w = weight.to(torch.float32)
    if mode == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r] / scaling, vh[:r]
    else:
        niter = int(mode.split("_niter_")[-1])
        ur, sr, v = torch.svd_lowrank(w, q=r, niter=niter)
        sr = sr / scaling
        vhr = v.t()
    root = torch.diag(torch.sqrt(sr))
    a = root @ vhr
    b = ur @ root
    return a, b, w - scaling * b @ a


def olora_init(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: QR of ``weight (out, in)``; returns ``A = R[:r]``, ``B = Q[:, :r]`` and ``W - s·B·A``."""
    w = weight.to(torch.float32)
    q, rr = torch.linalg.qr(w)
    a = rr[:r].contiguous()
    b = q[:, :r].contiguous()
    return a, b, w - scaling * b @ a
