"""The Triton source of :mod:`adapters_core.serving.gpu_bgmv` (imported only where Triton is installed)."""

import os

import triton
import triton.language as tl


def bgmv_step(x_ptr, a_ptr, b_ptr, slots_ptr, out_ptr, in_features, out_features, capacity, width,  # type: ignore[no-untyped-def]
              sx_row, so_row, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: row ``program_id(0)``'s outputs ``[program_id(1) · BLOCK_N, +BLOCK_N)`` of
    ``out[i] += (x[i] @ A[sᵢ][:, :width]) @ B[sᵢ][:width]``, products and sums in float32. The banks are
    contiguous, ``A (slots, in_features, capacity)`` and ``B (slots, capacity, out_features)``; ``x`` and
    ``out`` have unit stride along features (few arguments: each one costs launch time on the host)."""
    row = tl.program_id(0).to(tl.int64)  # (row offsets of a long prefill pass 2**31 elements)
    block = tl.program_id(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    rank = tl.arange(0, BLOCK_R)
    rank_ok = rank < width
    hidden = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_slot = a_ptr + slot * in_features * capacity
    for start in range(0, in_features, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        xk = tl.load(x_ptr + row * sx_row + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_slot + k[:, None] * capacity + rank[None, :], mask=k_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)
        hidden += tl.sum(xk[:, None] * a, axis=0)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    b = tl.load(b_ptr + slot * capacity * out_features + rank[:, None] * out_features + n[None, :],
                mask=rank_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(hidden[:, None] * b, axis=0)
    target = out_ptr + row * so_row + n
    current = tl.load(target, mask=n_ok, other=0.0)
    tl.store(target, (current.to(tl.float32) + delta).to(current.dtype), mask=n_ok)


@triton.jit
def _prefill_program(slots_ptr, tokens, width, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):  # type: ignore[no-untyped-def]
    """What a prefill program works on: its row, its ``BLOCK_T`` tokens and which of them exist, the row's slot,
    the rank lanes and which are in use. Rows and tokens are int64: a row's offset, or a token's within its row
    (``tokens x features`` past 2**31 elements: 60k tokens of a 35,840-wide layer), would wrap in int32. Token
    blocks are grid axis 0, rows axis 1: CUDA allows 2**31 - 1 programs on the first axis, 65,535 on the others
    (131,070 tokens at ``BLOCK_T`` 2)."""
    row = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rank = tl.arange(0, BLOCK_R)
    return row, t, t < tokens, tl.load(slots_ptr + row).to(tl.int64), rank, rank < width


def sgmv_shrink(x_ptr, a_ptr, slots_ptr, h_ptr, tokens, in_features, capacity, width,  # type: ignore[no-untyped-def]
                sx_row, sx_token, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """A prefill's first half, one program per ``BLOCK_T`` tokens (``program_id(0)``) of row ``program_id(1)``:
    ``h[i, t, :width] = x[i, t] @ A[sᵢ][:, :width]`` into a contiguous float32 ``h (rows, tokens, width)``."""
    row, t, t_ok, slot, rank, rank_ok = _prefill_program(slots_ptr, tokens, width, BLOCK_T, BLOCK_R)
    hidden = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    a_slot = a_ptr + slot * in_features * capacity
    x_row = x_ptr + row * sx_row + t[:, None] * sx_token
    for start in range(0, in_features, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        xk = tl.load(x_row + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_slot + k[:, None] * capacity + rank[None, :], mask=k_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)
        hidden += tl.sum(xk[:, :, None] * a[None, :, :], axis=1)
    target = h_ptr + (row * tokens + t[:, None]) * width + rank[None, :]
    tl.store(target, hidden, mask=t_ok[:, None] & rank_ok[None, :])


def sgmv_expand(h_ptr, b_ptr, slots_ptr, out_ptr, tokens, out_features, capacity, width,  # type: ignore[no-untyped-def]
                so_row, so_token, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """A prefill's second half: ``out[i, t, n] += h[i, t, :width] @ B[sᵢ][:width, n]`` for ``BLOCK_T`` tokens and
    ``BLOCK_N`` outputs of row ``program_id(1)`` per program, in float32, rounded once into ``out``."""
    row, t, t_ok, slot, rank, rank_ok = _prefill_program(slots_ptr, tokens, width, BLOCK_T, BLOCK_R)
    hidden = tl.load(h_ptr + (row * tokens + t[:, None]) * width + rank[None, :],
                     mask=t_ok[:, None] & rank_ok[None, :], other=0.0)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    b = tl.load(b_ptr + slot * capacity * out_features + rank[:, None] * out_features + n[None, :],
                mask=rank_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(hidden[:, :, None] * b[None, :, :], axis=1)
    target = out_ptr + row * so_row + t[:, None] * so_token + n[None, :]
    mask = t_ok[:, None] & n_ok[None, :]
    current = tl.load(target, mask=mask, other=0.0)
    tl.store(target, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


# Arguments that vary from call to call without changing the code worth generating: Triton would
# otherwise compile a variant per value class (1, a multiple of 16, other) of each, on the first call that
# brings it, stalling every request of that step; with these left general, one variant per rank block and
# dtype serves every call, and the server compiles them all before it takes requests (``GpuBgmv.warm_up``).
_GENERAL = ["capacity", "width"]


def compile_step():  # type: ignore[no-untyped-def]
    """:func:`bgmv_step` compiled for GPUs (run by Triton's interpreter on CPU tensors where
    ``TRITON_INTERPRET=1`` was set before Triton was imported)."""
    return triton.jit(bgmv_step, do_not_specialize=_GENERAL)


def compile_prefill():  # type: ignore[no-untyped-def]
    """:func:`sgmv_shrink` and :func:`sgmv_expand`, compiled as :func:`compile_step` compiles the step."""
    general = [*_GENERAL, "tokens"]
    return triton.jit(sgmv_shrink, do_not_specialize=general), triton.jit(sgmv_expand, do_not_specialize=general)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
