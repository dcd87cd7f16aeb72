"""A fused GPU kernel (Triton) for a decode step's LoRA product when every row may use its own adapter.

``out[i] += (x[i] @ A[sᵢ][:, :w]) @ B[sᵢ][:w]`` for a batch of one token per row, read straight from
the slot bank by slot id, in **one launch** per layer (rows on one adapter take it too: it replaces
torch's few dense operators there). A small model's decode step on a GPU is bound by
launches, not arithmetic or bandwidth (docs/benchmarks.md, "Inference server on a GPU"): torch's
best sequence for the same product (:func:`kernels.lora_delta_bank_step`) is six operators per layer,
which more than doubled an H200's step. Each program of the grid ``(rows, ⌈out / BLOCK_N⌉)`` computes
its row's ``h = x @ A[s][:, :w]`` in float32 (A read in ``BLOCK_K × BLOCK_R`` tiles), then its block of
``h @ B[s][:w]``, and adds it to ``out`` in place; the few programs of a row each recompute ``h``
(``in × w`` multiply-adds, from cache) rather than pay a second launch. A prefill of rows on different
adapters (several tokens per row) takes two launches (SGMV): one writes every token's ``h`` to a float32
scratch, the other multiplies it by B into ``out`` (recomputing ``h`` per block of outputs would cost
more than a launch for hundreds of tokens). Weights may be stored in
another dtype than ``x`` (a float16 bank under float32 products): they are widened as they are
loaded; products and sums are float32, ``out`` is rounded once, at the store.

Triton ships with CUDA builds of torch; it is imported only when the kernel is first loaded. Where it
cannot be used (no Triton, ``ADAPTERFORGE_GPU_KERNELS=off``) :func:`load_gpu_bgmv` returns ``None``,
logs why once, and the callers keep the torch path, which computes the same values up to rounding (in
16-bit products torch rounds the intermediate product and the sum, the kernel once); a launch of a
variant that has never run that fails (Triton cannot compile or launch it for this GPU) is logged, the
kernel stops accepting work, and that step and the following ones run on torch. A fault of a variant
that has run before, or running out of memory, fails that step only, as it would on torch. Tests run the
same kernel on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_TILE = 8192  # elements of the largest register tile a program holds (A's and B's)


class KernelUnavailable(RuntimeError):
    """The kernel cannot be used here (the message says why)."""


class GpuBgmv:
    """The compiled kernel; :meth:`step` launches it for one layer's decode step."""

    def __init__(self, kernel: Any, prefill_kernel: Any, interpret: bool) -> None:
        self._kernel = kernel
        self._prefill_kernel = prefill_kernel
        self.interpret = interpret  # Triton's interpreter (CPU tensors, tests), not a GPU
        self.launches = 0  # GPU kernel launches since the process started (benchmarks and checks read it)
        self.failure: str | None = None  # why a launch failed (Triton could not compile it); set: not used again
        self._launched: set[tuple[Any, ...]] = set()  # variants that have run: a later failure is the step's alone

    def accepts(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether :meth:`step` can take this ``x`` / ``out`` pair: ``(rows, tokens, features)`` both, the same
        rows and tokens, unit stride along features, on the kernel's kind of device."""
        return (self.failure is None and x.dim() == 3 and out.dim() == 3
                and out.shape[:2] == x.shape[:2] and x.stride(2) == 1 and out.stride(2) == 1
                and (x.device.type == "cpu") == self.interpret and x.device == out.device)

    def step(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, width: int,
             out: torch.Tensor) -> torch.Tensor:
        """``out[i, t] += (x[i, t] @ a[slots[i]][:, :width]) @ b[slots[i]][:width]`` in place, one launch: ``x``
        ``(batch, tokens, in)`` (one token: a decode step; more: a prefill), ``a`` ``(slots, in, capacity)``, ``b``
        ``(slots, capacity, out)`` (pre-scaled, both contiguous: the slot bank), ``out`` ``(batch, tokens, out)``
        (see :meth:`accepts`)."""
        if not (a.is_contiguous() and b.is_contiguous() and x.stride(2) == 1 and out.stride(2) == 1):
            raise ValueError("the fused LoRA step needs contiguous banks and unit feature strides (see accepts)")
        # what Triton compiles a variant for: a variant that has run once is compiled (a later fault is the launch's)
        variant = (x.shape[1] == 1, rank_block(width), x.dtype, a.dtype, x.shape[2], out.shape[2])
        try:
            if x.is_cuda and x.device.index != torch.cuda.current_device():  # Triton launches on the current one
                with torch.cuda.device(x.device):
                    self._launch(x, a, b, slots, width, out)
            else:
                self._launch(x, a, b, slots, width, out)
        except torch.OutOfMemoryError:
            raise  # this step's (the engine answers its rows): the kernel stays in use
        except Exception as exc:
            if variant in self._launched:
                raise  # a fault of this launch, of a variant that has run: the step fails, the kernel stays
            # a Triton that cannot compile or launch this variant for this GPU: serve on torch's operators
            self.failure = f"{exc.__class__.__name__}: {exc}"
            logger.exception("the fused GPU LoRA kernel failed to launch; decode steps use torch's operators from now on")
            raise KernelUnavailable(self.failure) from exc
        self._launched.add(variant)
        self.launches += 1 if x.shape[1] == 1 else 2
        return out

    def warm_up(self, shapes: Iterable[tuple[int, int]], max_rank: int, *, dtype: torch.dtype,
                weight_dtype: torch.dtype, device: torch.device) -> int:
        """Run every variant that layers of these ``(in_features, out_features)`` shapes can launch, for ranks
        up to ``max_rank`` (a decode step and a prefill per rank block), on scratch tensors of one slot and one
        row: Triton compiles each on its first launch, which should happen before the server takes requests
        (a compile in a served step stalls every row of it). Returns the launches made;
        :class:`KernelUnavailable` if one fails (logged, and the kernel then accepts nothing)."""
        launches = self.launches
        distinct = list(dict.fromkeys(shapes))  # (read once: ``shapes`` may be a one-pass iterable)
        slots = torch.zeros(1, dtype=torch.long, device=device)
        block_r, top = 16, rank_block(max_rank)
        while block_r <= top:
            for in_features, out_features in distinct:
                a = torch.zeros((1, in_features, block_r), dtype=weight_dtype, device=device)
                b = torch.zeros((1, block_r, out_features), dtype=weight_dtype, device=device)
                for tokens in (1, 2):  # a decode step, then a prefill
                    x = torch.zeros((1, tokens, in_features), dtype=dtype, device=device)
                    out = torch.zeros((1, tokens, out_features), dtype=dtype, device=device)
                    self.step(x, a, b, slots, block_r, out)
            block_r *= 2
        return self.launches - launches

    def _launch(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, width: int,
                out: torch.Tensor) -> None:
        batch, tokens, in_features = x.shape
        out_features, capacity = out.shape[-1], a.shape[-1]
        block_r = rank_block(width)
        if tokens == 1:
            block_k, block_n, warps = decode_blocks(in_features, out_features, block_r)
            self._kernel[(batch, -(-out_features // block_n))](
                x, a, b, slots, out, in_features, out_features, capacity, width, x.stride(0), out.stride(0),
                BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=True)
            return
        # a prefill: two launches, through h (rows, tokens, width) in float32, so that no program recomputes
        # h for its block of outputs (the decode step does; for hundreds of tokens it would cost more than a
        # launch)
        shrink, expand = self._prefill_kernel
        block_t, block_k, block_n, warps = prefill_blocks(in_features, out_features, block_r)
        h = torch.empty((batch, tokens, width), dtype=torch.float32, device=x.device)
        blocks_t = -(-tokens // block_t)
        shrink[(blocks_t, batch)](x, a, slots, h, tokens, in_features, capacity, width, x.stride(0), x.stride(1),
                                  BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
                                  enable_fp_fusion=True)
        expand[(blocks_t, batch, -(-out_features // block_n))](
            h, b, slots, out, tokens, out_features, capacity, width, out.stride(0), out.stride(1),
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=True)


def rank_block(width: int) -> int:
    """The rank lanes a program holds for rank width ``width``: a power of two, at least 16 (masked lanes
    past ``width`` cost nothing to speak of). One compiled variant per value, with the two below."""
    return max(16, _next_power_of_2(width))


def decode_blocks(in_features: int, out_features: int, block_r: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_N, num_warps)`` of a decode step's launch: A's ``BLOCK_K × BLOCK_R`` and B's
    ``BLOCK_R × BLOCK_N`` register tiles stay within ``_TILE`` elements."""
    block_n = max(16, min(256, _TILE // block_r, _next_power_of_2(out_features)))
    block_k = max(16, min(128, _TILE // block_r, _next_power_of_2(in_features)))
    return block_k, block_n, _warps(max(block_k, block_n) * block_r)


def prefill_blocks(in_features: int, out_features: int, block_r: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_K, BLOCK_N, num_warps)`` of a prefill's two launches: tiles of ``BLOCK_T`` tokens ×
    ``BLOCK_K`` inputs (or ``BLOCK_N`` outputs) × ``BLOCK_R`` ranks within ``_TILE`` elements. They do not depend
    on the number of tokens (a short prefill masks the token lanes it lacks), so every prefill at one rank
    block runs the same compiled variant."""
    block_t = max(2, min(16, _TILE // (block_r * 32)))
    block_k = max(16, min(64, _TILE // (block_t * block_r), _next_power_of_2(in_features)))
    block_n = max(16, min(128, _TILE // (block_t * block_r), _next_power_of_2(out_features)))
    return block_t, block_k, block_n, 4  # Triton's default (8 warps made ptxas spill a few bytes here)


def _warps(tile: int) -> int:
    """Warps per decode program for a largest register tile of ``tile`` elements: 8 for a full ``_TILE`` (with
    4, ptxas spilled 200-312 bytes per thread in float16 at rank block 128 on sm_80 and sm_90), else 4."""
    return 8 if tile >= _TILE else 4


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _enabled() -> bool:
    value = os.environ.get("ADAPTERFORGE_GPU_KERNELS", "auto").strip().lower()
    if value not in ("auto", "on", "off"):
        raise KernelUnavailable(f"ADAPTERFORGE_GPU_KERNELS must be auto, on or off, not {value!r}")
    return value != "off"


@functools.cache
def _compiled() -> GpuBgmv:
    try:
        from adapters_core.serving import gpu_bgmv_source  # imports Triton
    except ImportError as exc:
        raise KernelUnavailable(f"Triton is not installed ({exc})") from exc
    return GpuBgmv(gpu_bgmv_source.compile_step(), gpu_bgmv_source.compile_prefill(), gpu_bgmv_source.interpreted())


def load_gpu_bgmv_or_raise() -> GpuBgmv:
    """The kernel (one per process; run by Triton's interpreter on CPU tensors where ``TRITON_INTERPRET=1``
    was set before Triton was imported: the tests); :class:`KernelUnavailable` says why it cannot be used."""
    if not _enabled():
        raise KernelUnavailable("disabled by ADAPTERFORGE_GPU_KERNELS=off")
    return _compiled()


@functools.cache
def load_gpu_bgmv() -> GpuBgmv | None:
    """The kernel for CUDA devices, or ``None`` (logged once, with the reason): callers then compute the
    same product with torch."""
    try:
        if not _enabled():
            logger.info("GPU LoRA kernel switched off (ADAPTERFORGE_GPU_KERNELS=off); LoRA products use torch")
            return None
        return load_gpu_bgmv_or_raise()
    except KernelUnavailable as exc:
        logger.warning("GPU LoRA kernel not used (%s); LoRA products use torch instead", exc)
        return None
