"""A compiled CPU kernel for the LoRA product of a batch whose rows use different adapters (BGMV/SGMV).

``out[i, t] += (x[i, t] @ A[s(i)][:, :r]) @ B[s(i)][:r]`` in float32 for every token ``t`` of row
``i``, where ``s(i)`` is the slot the call names for row ``i`` and ``r`` that slot's own rank on the
layer (at most the call's width): the kernel reads each row's weights straight from the slot bank
(:meth:`Bgmv.prepare_bank`), so nothing is gathered or copied when rows join a batch, and a row reads
only its own adapter's rank columns (a row whose slot has nothing on the layer reads nothing). Stock
torch runs a decode step as a gather of every row's weights plus two ``bmm`` calls of 32 tiny
matrices, which on a CPU costs several times what reading the weights costs; this kernel
(``bgmv_cpu.cpp``, AVX2 + FMA + F16C) reads each row's weights once, in order, in a prefill feeds each
weight it loads to 4 tokens, and splits the rows over the threads by the rank columns they multiply.

``x`` and ``out`` are float32; the bank's weights are float32 or float16 (half the memory, and half the
memory traffic of a decode step), widened to float32 as they are loaded: every product and sum is a
float32 operation, in the same order either way, so a float16 bank gives bit for bit what the float32
kernel gives on that bank upcast (``a.float()``, ``b.float()``).

The source ships with the package and is compiled on first use with the host's C++ compiler
(``$CXX``, else ``g++`` or ``c++``; about a second) into a cache directory, keyed by the source and
the flags, then loaded with ``ctypes``: no build step at install time (the API image compiles it
while it is built, and keeps no compiler). Where it cannot be used (no
compiler, not x86-64 with AVX2, FMA and F16C, ``ADAPTERFORGE_CPU_KERNELS=off``) :func:`load_bgmv` returns
``None``, logs why once, and the callers keep the stock torch path, which computes the same values.

Settings: ``ADAPTERFORGE_CPU_KERNELS`` (``auto`` | ``off``, default ``auto``; ``SlottedModel(...,
cpu_kernels=False)`` also switches it off) and ``ADAPTERFORGE_KERNEL_CACHE_DIR`` or
:func:`set_cache_dir` (default ``$XDG_CACHE_HOME/adapterforge/kernels``, else
``~/.cache/adapterforge/kernels``): the service's settings of the same names.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bgmv_cpu.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (the message says why)."""


class _Args(ctypes.Structure):
    """``AfBgmvArgs`` of ``bgmv_cpu.cpp``, field for field."""

    _fields_ = [("batch", _I64), ("in_features", _I64), ("width", _I64), ("out_features", _I64),
                ("a", _PTR), ("sa_row", _I64), ("sa_in", _I64), ("b", _PTR), ("sb_row", _I64), ("sb_r", _I64),
                ("idx", _PTR), ("x", _PTR), ("sx", _I64), ("out", _PTR), ("so", _I64), ("threads", _I64),
                ("tokens", _I64), ("sx_tok", _I64), ("so_tok", _I64), ("ranks", _PTR)]


class Bgmv:
    """The loaded kernel: :meth:`prepare_bank` binds a slot bank once, the result runs per forward."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        library.af_bgmv_args_size.restype = _I64
        if library.af_bgmv_args_size() != ctypes.sizeof(_Args):
            raise KernelUnavailable(f"{path} does not match this module (argument layout)")
        self._fns: dict[torch.dtype, Any] = {}  # by the bank's weight dtype
        for dtype, fn in ((torch.float32, library.af_bgmv_f32), (torch.float16, library.af_bgmv_f16w)):
            fn.argtypes = [_PTR]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        library.af_bgmv_max_width.restype = _I64
        self.max_width = int(library.af_bgmv_max_width())

    def prepare_bank(self, a: torch.Tensor, b: torch.Tensor, width: int,
                     ranks: torch.Tensor | None = None) -> BankCall | None:
        """A call over the whole slot bank ``a (slots, in, ≥width)``, ``b (slots, ≥width, out)``, both float32
        or both float16, for rows of any number of tokens, each row on the slot its call names. ``ranks``: an
        int64 CPU vector, each slot's rank on this layer (0: nothing), read at every call: a row multiplies only
        ``min(width, ranks[slot])`` rank columns (the columns past a slot's rank must hold zeros, as the
        bank's do, for the result to be what ``width`` columns give); ``None``: every row multiplies
        ``width``. ``None`` is returned where the kernel does not apply (dtype, device, layout, width):
        the caller uses torch. The tensors must outlive the call object and keep their storage (it holds
        their addresses)."""
        return BankCall(self._fns[a.dtype], a, b, width, ranks) if self._fits(a, b, width, ranks) else None

    def _fits(self, a: torch.Tensor, b: torch.Tensor, width: int, ranks: torch.Tensor | None) -> bool:
        """Whether the kernel reads ``a``, ``b`` and ``ranks`` as they are (dtype, device, layout) at ``width``."""
        return (a.dtype == b.dtype and a.dtype in self._fns and a.device.type == b.device.type == "cpu"
                and a.dim() == b.dim() == 3 and a.stride(2) == 1 and b.stride(2) == 1
                and 1 <= width <= min(self.max_width, a.shape[2], b.shape[1]) and a.shape[0] == b.shape[0]
                and (ranks is None or (ranks.dtype == torch.int64 and ranks.device.type == "cpu"
                                       and ranks.shape == (a.shape[0],) and ranks.is_contiguous())))


class BankCall:
    """``out[i, t] += (x[i, t] @ A[slots[i]][:, :r]) @ B[slots[i]][:r]`` for rows of any number of tokens,
    read straight from the bound slot bank, with ``r`` the width or the row's slot rank; see
    :meth:`Bgmv.prepare_bank`. Holds the kernel's argument struct for the bank, rewritten in place per call.
    ``fn``: the kernel's entry point for the bank's weight dtype (``af_bgmv_f32`` or ``af_bgmv_f16w``)."""

    def __init__(self, fn: Any, a: torch.Tensor, b: torch.Tensor, width: int,
                 ranks: torch.Tensor | None = None) -> None:
        self._fn = fn
        self._keep = (a, b)  # the addresses below stay valid while this call lives
        self.ranks = ranks  # each slot's rank (None: every row multiplies ``width`` columns)
        self.width = width
        self.num_slots = int(a.shape[0])
        self.in_features, self.out_features = int(a.shape[1]), int(b.shape[2])
        self._args = _Args(0, self.in_features, width, self.out_features, a.data_ptr(), a.stride(0), a.stride(1),
                           b.data_ptr(), b.stride(0), b.stride(1))
        self._args.ranks = None if ranks is None else ranks.data_ptr()
        self._address = ctypes.addressof(self._args)

    def accepts(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``x (rows, tokens, in)`` and ``out (rows, tokens, out)`` are float32 CPU tensors with
        contiguous features (any row and token strides): the only layout the kernel reads."""
        return (x.dtype == out.dtype == torch.float32 and x.device.type == out.device.type == "cpu"
                and x.dim() == out.dim() == 3 and x.stride(2) == 1 and out.stride(2) == 1
                and x.shape[2] == self.in_features and out.shape == (x.shape[0], x.shape[1], self.out_features))

    def __call__(self, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, highest: int) -> torch.Tensor:
        """Add the products to ``out`` in place and return it. ``x`` and ``out`` must be what :meth:`accepts`
        accepts; ``slots``: one int64 slot id per row, none negative (``SlottedModel.route`` checks both),
        ``highest`` the largest of them: checked against the bank here, with no tensor reduction per call
        (the kernel reads whatever slot it is given)."""
        rows, tokens = x.shape[0], x.shape[1]
        if (slots.dtype != torch.int64 or slots.device.type != "cpu" or slots.dim() != 1 or not slots.is_contiguous()
                or slots.shape[0] != rows):
            raise ValueError(f"slots must be a contiguous int64 CPU vector of {rows} slot ids")
        if highest >= self.num_slots:
            raise ValueError(f"slot {highest} is past the bank's {self.num_slots} slots")
        if rows == 0 or tokens == 0:
            return out
        args = self._args
        args.batch, args.tokens, args.idx = rows, tokens, slots.data_ptr()
        args.x, args.sx, args.sx_tok = x.data_ptr(), x.stride(0), x.stride(1)
        args.out, args.so, args.so_tok = out.data_ptr(), out.stride(0), out.stride(1)
        args.threads = torch.get_num_threads()
        if self._fn(self._address):
            raise RuntimeError(f"{self._fn.__name__} refused its arguments (width {self.width}, {tokens} tokens)")
        return out


_cache_override: Path | None = None  # set_cache_dir(); None: the environment or the default


def set_cache_dir(directory: Path | None) -> None:
    """Keep kernel builds in ``directory`` (``None``: ``$ADAPTERFORGE_KERNEL_CACHE_DIR`` or the default);
    the next :func:`load_bgmv` looks there."""
    global _cache_override
    _cache_override = directory
    load_bgmv.cache_clear()


def _enabled() -> bool:
    value = os.environ.get("ADAPTERFORGE_CPU_KERNELS", "auto").strip().lower()
    if value not in ("auto", "off"):
        raise KernelUnavailable(f"ADAPTERFORGE_CPU_KERNELS must be auto or off, not {value!r}")
    return value == "auto"


def _cpu_supported() -> str | None:
    """Why this CPU cannot run the kernel, or ``None``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 only (this is {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2" and not capability.startswith("AVX512"):
        return f"torch reports CPU capability {capability}; the kernel needs AVX2, FMA and F16C"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if not re.search(r"^flags\s*:.*\bfma\b", cpuinfo, re.MULTILINE):
        return "the CPU has no FMA instructions"
    if not re.search(r"^flags\s*:.*\bf16c\b", cpuinfo, re.MULTILINE):
        return "the CPU has no F16C instructions (float16 conversions)"
    return None


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelUnavailable("no C++ compiler found ($CXX, g++ or c++)")


def _cache_dir() -> Path:
    if _cache_override is not None:
        return _cache_override
    explicit = os.environ.get("ADAPTERFORGE_KERNEL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adapterforge" / "kernels"


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source and flags) and return the shared library's path. A library
    already in the cache needs no compiler: images build it once (``docker/Dockerfile.api``)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    directory = cache_dir or _cache_dir()
    target = directory / f"bgmv_cpu-{key}.so"
    if target.exists():
        return target
    compiler = _compiler()
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True,
                                timeout=300, check=False)
        if result.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: concurrent builders (server, workers) never see half a file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built the CPU LoRA kernel: %s", target)
    return target


def load_bgmv_or_raise() -> Bgmv:
    """Build (if needed) and load the kernel; :class:`KernelUnavailable` says why it cannot be."""
    if not _enabled():
        raise KernelUnavailable("disabled by ADAPTERFORGE_CPU_KERNELS=off")
    reason = _cpu_supported()
    if reason:
        raise KernelUnavailable(reason)
    path = build()
    try:
        # PyDLL: calls keep the GIL. A call takes tens of microseconds; releasing the GIL for it would let
        # the HTTP threads take it, and the engine thread would wait for it back after every layer
        library = ctypes.PyDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"cannot load {path}: {exc}") from exc
    return Bgmv(library, path)


@functools.cache
def load_bgmv() -> Bgmv | None:
    """The kernel, or ``None`` (logged once, with the reason) where it cannot be used: callers then
    compute the same product with torch."""
    try:
        if not _enabled():
            logger.info("CPU LoRA kernel switched off (ADAPTERFORGE_CPU_KERNELS=off); LoRA products use torch")
            return None
        return load_bgmv_or_raise()
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as exc:
        logger.warning("CPU LoRA kernel not used (%s); LoRA products use torch instead", exc)
        return None
