"""The compiled CPU LoRA kernel (``adapters_core.serving.cpu_bgmv``) against torch.

Every shape the serving layers hand it (ranks that are and are not multiples of the vector width,
strided views of a rank-padded slot bank, rows on any slot in any order, one token per row or many,
outputs that already hold the base model's result) must give what ``bmm`` gives, from float32 and from
float16 banks (which must give bit for bit what the float32 kernel gives on the bank upcast); where it
cannot be built or is switched off, loading says why and serving computes the same logits with torch.

Under AddressSanitizer (every A, B and output access of these shapes stays in bounds; GCC does not
instrument the broadcast and masked loads, which a bank that ends where readable memory ends checks
instead: ``at_page_end``), with KEY the cache key ``cpu_bgmv.build`` uses::

    g++ -O1 -g -fsanitize=address -mavx2 -mfma -mf16c -fopenmp -std=c++17 -shared -fPIC \
        -o /tmp/asan/bgmv_cpu-KEY.so adapters_core/serving/bgmv_cpu.cpp
    ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(g++ -print-file-name=libasan.so) \
        ADAPTERFORGE_KERNEL_CACHE_DIR=/tmp/asan python -m pytest tests/core/test_cpu_bgmv.py
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters_core.serving import cpu_bgmv
from adapters_core.serving.cpu_bgmv import BankCall, Bgmv, KernelUnavailable

_REASON = cpu_bgmv._cpu_supported()
needs_kernel = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernel cannot run here: {_REASON}")
# the slot bank's weights: float32 (af_bgmv_f32) or float16 (af_bgmv_f16w)
bank_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])


@pytest.fixture(autouse=True)
def _fresh_kernel_settings() -> Iterator[None]:
    """Each test decides from its own settings and environment, and leaves the process as it found it."""
    saved = cpu_bgmv._cache_override
    cpu_bgmv.set_cache_dir(None)
    yield
    cpu_bgmv.set_cache_dir(saved)


@pytest.fixture(scope="module")
def kernel() -> Bgmv:
    if _REASON is not None:
        pytest.skip(f"CPU kernel cannot run here: {_REASON}")
    return cpu_bgmv.load_bgmv_or_raise()


def reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, width: int, out: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
    """``out[i, t] + (x[i, t] @ A[slots[i]][:, :width]) @ B[slots[i]][:width]`` in float64 (of the bank's
    values as they are stored: a float16 bank's rounded weights)."""
    a64, b64 = a[slots, :, :width].double(), b[slots, :width].double()
    return out.double() + torch.bmm(torch.bmm(x.double(), a64), b64)


def weights(n: int, in_features: int, capacity: int, out_features: int, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, in_features, capacity, generator=g).to(dtype),
            (torch.randn(n, capacity, out_features, generator=g) / capacity**0.5).to(dtype))


class Checked:
    """``kernel.prepare_bank(a, b, width, ranks)`` (which must take the bank), called as it is; on a float16
    bank each call also runs the float32 kernel on the bank as it then is, upcast, and checks that both
    add the very same bits: the weights are widened exactly, and every product and sum is the same
    float32 operation in the same order."""

    def __init__(self, kernel: Bgmv, a: torch.Tensor, b: torch.Tensor, width: int,
                 ranks: torch.Tensor | None = None) -> None:
        call = kernel.prepare_bank(a, b, width, ranks)
        assert call is not None
        self.call: BankCall = call
        self.kernel, self.a, self.b, self.width, self.ranks = kernel, a, b, width, ranks

    def accepts(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        return self.call.accepts(x, out)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, highest: int) -> torch.Tensor:
        if self.a.dtype != torch.float16:
            return self.call(x, out, slots, highest)
        upcast = self.kernel.prepare_bank(self.a.float(), self.b.float(), self.width, self.ranks)
        assert upcast is not None
        expected = upcast(x, out.clone(), slots, highest)
        result = self.call(x, out, slots, highest)
        assert torch.equal(out, expected), "af_bgmv_f16w differs from af_bgmv_f32 on the bank upcast"
        return result


@needs_kernel
@bank_dtypes
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize("in_features,out_features", [(7, 5), (256, 688), (256, 256), (33, 40)])
@pytest.mark.parametrize("width", [1, 3, 4, 8, 13, 16, 21, 24, 29, 37, 40, 64])
def test_decode_rows_match_torch(kernel: Bgmv, batch: int, in_features: int, out_features: int, width: int,
                                 dtype: torch.dtype) -> None:
    """One token per row (a decode step), each row on its own slot of a bank of capacity 64 (so narrower
    widths read strided views), added to a non-zero output. The columns past ``width`` hold NaN: a
    product that read one would show it. The widths take every way of cutting the rank columns into
    blocks of 32, 24, 16 and 8 and a partial vector."""
    a, b = weights(batch + 1, in_features, 64, out_features, dtype=dtype)
    a[:, :, width:], b[:, width:] = float("nan"), float("nan")
    slots = torch.arange(batch, 0, -1)  # slots batch..1, in reverse
    x = torch.randn(batch, 1, in_features)
    out = torch.randn(batch, 1, out_features)
    expected = reference(x, a, b, width, out, slots)
    call = Checked(kernel, a, b, width)
    assert call.accepts(x, out)
    result = call(x, out, slots, highest=batch)
    assert result is out  # in place
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernel
@bank_dtypes
def test_slots_never_routed_are_never_read(kernel: Bgmv, dtype: torch.dtype) -> None:
    """A batch of 5 rows over a bank of 8 slots, with ``x`` and ``out`` rows that are views into wider
    tensors (the layout a decode step's hidden states can have): slots no row names hold NaN."""
    a, b = weights(8, 96, 24, 80, seed=1, dtype=dtype)
    slots = torch.tensor([1, 3, 3, 0, 6])
    unused = torch.tensor([2, 4, 5, 7])
    a[unused], b[unused] = float("nan"), float("nan")
    x_wide, out_wide = torch.randn(5, 1, 130), torch.randn(5, 1, 100)
    x, out = x_wide[:, :, 10:106], out_wide[:, :, 3:83]
    assert x.stride(0) == 130 and out.stride(0) == 100
    expected = reference(x, a, b, 20, out, slots)
    before = out_wide.clone()
    call = Checked(kernel, a, b, 20)
    assert call.accepts(x, out)
    call(x, out, slots, highest=6)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = torch.ones_like(out_wide, dtype=torch.bool)
    untouched[:, :, 3:83] = False
    assert torch.equal(out_wide[untouched], before[untouched])  # nothing written outside the view


@needs_kernel
@bank_dtypes
@pytest.mark.parametrize("tokens", [1, 2, 7, 32])
@pytest.mark.parametrize("width", [1, 3, 8, 13, 16, 37, 40])
def test_rows_of_many_tokens_read_the_bank_by_slot(kernel: Bgmv, tokens: int, width: int, dtype: torch.dtype) -> None:
    """Prefill rows: each row's tokens on its own slot (repeated, out of order, slot 0), straight from a
    bank of capacity 48 whose columns past ``width`` hold NaN, into strided inputs and outputs."""
    a, b = weights(6, 96, 48, 91, seed=4, dtype=dtype)  # 91 outputs: 5 blocks of 16, one of 8, 3 more
    a[:, :, width:], b[:, width:] = float("nan"), float("nan")
    slots = torch.tensor([5, 0, 5, 2])
    x = torch.randn(4, tokens, 120)[:, :, 10:106]
    out_wide = torch.randn(4, tokens, 100)
    out = out_wide[:, :, 5:96]
    expected = reference(x, a, b, width, out, slots)
    before = out_wide.clone()
    call = Checked(kernel, a, b, width)
    assert call.accepts(x, out)
    assert call(x, out, slots, highest=5) is out
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = torch.ones_like(out_wide, dtype=torch.bool)
    untouched[:, :, 5:96] = False
    assert torch.equal(out_wide[untouched], before[untouched])


@needs_kernel
@bank_dtypes
@pytest.mark.parametrize("tokens", [1, 5])
def test_each_row_reads_only_its_own_slots_rank(kernel: Bgmv, tokens: int, dtype: torch.dtype) -> None:
    """A bank of ranks 16, 3, 0 (no adapter on the layer), 40 and 9 in slots 1..5, called at width 40 (the
    largest rank routed): every row multiplies only its own slot's rank columns, read at each call. The
    columns past each slot's rank hold NaN, as does all of slot 3, so a row that read one would show it;
    slot 0 (the base model) and slot 3 rows keep the output as it was."""
    ranks = torch.tensor([0, 16, 3, 0, 40, 9])
    a, b = weights(6, 72, 48, 50, seed=5, dtype=dtype)
    for slot, rank in enumerate(ranks.tolist()):
        a[slot, :, rank:], b[slot, rank:] = float("nan"), float("nan")
    slots = torch.tensor([4, 2, 0, 1, 3, 5, 4, 2])
    x, out = torch.randn(8, tokens, 72), torch.randn(8, tokens, 50)
    clean_a, clean_b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    expected = reference(x, clean_a, clean_b, 40, out, slots)
    before = out.clone()
    call = Checked(kernel, a, b, 40, ranks)
    assert call.accepts(x, out)
    call(x, out, slots, highest=5)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out[2], before[2]) and torch.equal(out[4], before[4])  # slots 0 and 3: nothing added
    # ranks are read at each call: slot 2 now holds a rank-12 adapter (and nothing holds NaN there)
    a[2], b[2] = clean_a[1, :, :], clean_b[1]
    a[2, :, 12:], b[2, 12:] = 0.0, 0.0
    ranks[2] = 12
    out = torch.randn(8, tokens, 50)
    expected = reference(x, torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0), 40, out, slots)
    call(x, out, slots, highest=5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # a narrower call still caps every row at its width (rows of rank 40 multiply 16 columns)
    narrow = Checked(kernel, a, b, 16, ranks)
    out = torch.randn(8, tokens, 50)
    clean_a, clean_b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    expected = reference(x, clean_a, clean_b, 16, out, slots)
    narrow(x, out, slots, highest=5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernel
@bank_dtypes
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("tokens", [1, 6])
def test_rows_split_over_threads_by_their_rank_add_every_product_once(kernel: Bgmv, threads: int, tokens: int,
                                                                       dtype: torch.dtype) -> None:
    """The threads take contiguous ranges of about equal rank columns: whatever the layout (base rows
    bunched at one end, one wide row, fewer rows than threads, no row with anything to add), every row
    gets its product exactly once and base rows keep their output."""
    ranks = torch.tensor([0, 4, 32, 1, 16])
    a, b = weights(5, 40, 32, 24, seed=6, dtype=dtype)
    for slot, rank in enumerate(ranks.tolist()):
        a[slot, :, rank:], b[slot, rank:] = float("nan"), float("nan")
    clean_a, clean_b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    call = Checked(kernel, a, b, 32, ranks)
    layouts = [[0] * 12 + [1, 4, 4, 3, 1, 4], [2] + [1] * 9, [4, 0, 2], [3], [0, 0, 0, 0], [1, 2, 3, 4] * 5]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in layouts:
            slots = torch.tensor(layout)
            x, out = torch.randn(len(layout), tokens, 40), torch.randn(len(layout), tokens, 24)
            expected = reference(x, clean_a, clean_b, 32, out, slots)
            call(x, out, slots, highest=max(layout))
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4, msg=str(layout))
    finally:
        torch.set_num_threads(saved)


@needs_kernel
def test_slot_ranks_the_kernel_cannot_read_are_left_to_torch(kernel: Bgmv) -> None:
    a, b = weights(4, 16, 8, 12)
    assert kernel.prepare_bank(a, b, 8, torch.zeros(4, dtype=torch.int32)) is None  # int64 only
    assert kernel.prepare_bank(a, b, 8, torch.zeros(3, dtype=torch.int64)) is None  # one per slot
    assert kernel.prepare_bank(a, b, 8, torch.zeros(8, dtype=torch.int64)[::2]) is None  # contiguous
    assert kernel.prepare_bank(a, b, 8, torch.zeros(4, dtype=torch.int64)) is not None


@needs_kernel
@bank_dtypes
def test_a_bank_call_refuses_slots_it_cannot_read(kernel: Bgmv, dtype: torch.dtype) -> None:
    a, b = weights(4, 16, 8, 12, dtype=dtype)
    call = kernel.prepare_bank(a, b, 8)
    assert call is not None
    x, out = torch.randn(2, 3, 16), torch.zeros(2, 3, 12)
    with pytest.raises(ValueError, match="slot 4 is past the bank's 4 slots"):
        call(x, out, torch.tensor([0, 4]), highest=4)
    with pytest.raises(ValueError, match="contiguous int64 CPU vector of 2 slot ids"):
        call(x, out, torch.tensor([0, 1], dtype=torch.int32), highest=1)
    with pytest.raises(ValueError, match="2 slot ids"):
        call(x, out, torch.tensor([0, 1, 2]), highest=2)
    assert torch.equal(out, torch.zeros(2, 3, 12))  # nothing written
    assert not call.accepts(x.double(), out.double())
    assert not call.accepts(torch.randn(2, 3, 32)[:, :, ::2], out)  # features not contiguous
    assert not call.accepts(x, torch.zeros(2, 4, 12))  # as many output tokens as input tokens
    assert not call.accepts(x.half(), out) and not call.accepts(x, out.half())  # float32 only, whatever the bank
    assert kernel.prepare_bank(a.double(), b.double(), 8) is None
    # arguments the kernel itself refuses (prepare_bank lets no such width through): the error names the
    # entry point called
    call._args.width = kernel.max_width + 1
    name = "af_bgmv_f16w" if dtype == torch.float16 else "af_bgmv_f32"
    with pytest.raises(RuntimeError, match=f"{name} refused its arguments"):
        call(x, out, torch.tensor([0, 1]), highest=1)
    assert torch.equal(out, torch.zeros(2, 3, 12))


def at_page_end(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` whose last byte is the last before a page that cannot be read: a
    load past its end crashes the process (a masked-off lane, which the CPU neither reads nor faults
    on, does not)."""
    nbytes = tensor.numel() * tensor.element_size()
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    buffer = mmap.mmap(-1, size + mmap.PAGESIZE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert mprotect(start + size, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()  # PROT_NONE
    copy = torch.frombuffer(buffer, dtype=torch.uint8)[size - nbytes:size].view(tensor.dtype).view(tensor.shape)
    return copy.copy_(tensor)


@needs_kernel
@bank_dtypes
@pytest.mark.parametrize("width", [9, 12, 15])
def test_one_call_serves_batches_of_any_size_and_tokens(kernel: Bgmv, width: int, dtype: torch.dtype) -> None:
    """A call bound to a bank serves a batch of 8 rows, then of 3, 6 and 1 (rows join and leave between
    decode steps), and prefills of several tokens, each time reading only the rows' own slots. The bank
    has exactly the call's rank columns (8 and a partial vector of 1, 4 or 7) and ends where readable
    memory ends: the last slot's last row of A, which every batch reads, ends the allocation, so a
    load past the row's columns would crash (and show under AddressSanitizer)."""
    a, b = (at_page_end(w) for w in weights(9, 40, width, 24, seed=3, dtype=dtype))
    call = Checked(kernel, a, b, width)
    for rows, tokens in ((8, 1), (3, 1), (6, 5), (1, 1), (2, 9)):
        slots = torch.randint(0, 9, (rows,), generator=torch.Generator().manual_seed(rows))
        slots[-1] = 8
        x, out = torch.randn(rows, tokens, 40), torch.randn(rows, tokens, 24)
        expected = reference(x, a, b, width, out, slots)
        assert call.accepts(x, out)
        call(x, out, slots, int(slots.max()))
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_what_the_kernel_does_not_take_is_left_to_torch(kernel: Bgmv) -> None:
    a, b = weights(4, 16, 8, 12)
    assert kernel.prepare_bank(a.double(), b.double(), 8) is None  # float32 or float16 only
    assert kernel.prepare_bank(a.bfloat16(), b.bfloat16(), 8) is None
    assert kernel.prepare_bank(a.half(), b, 8) is None and kernel.prepare_bank(a, b.half(), 8) is None  # one dtype
    assert kernel.prepare_bank(a.half(), b.half(), 8) is not None
    assert kernel.prepare_bank(a, b, 0) is None and kernel.prepare_bank(a, b, 9) is None  # width within capacity
    assert kernel.prepare_bank(a[:3], b, 8) is None  # as many A as B
    assert kernel.prepare_bank(a.transpose(1, 2).contiguous().transpose(1, 2), b, 8) is None  # A's columns strided
    call = kernel.prepare_bank(a, b, 8)
    assert call is not None
    x, out = torch.randn(4, 1, 16), torch.randn(4, 1, 12)
    assert call.accepts(x, out)
    assert not call.accepts(x[:3], out)  # as many output rows as input rows
    assert not call.accepts(x.double(), out.double())
    assert not call.accepts(torch.randn(4, 1, 32)[:, :, ::2], out)  # features not contiguous
    assert not call.accepts(torch.randn(4, 1, 15), out)
    assert not call.accepts(x, torch.randn(4, 1, 13))


def test_switched_off_by_setting_or_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ADAPTERFORGE_CPU_KERNELS", "off")
    with caplog.at_level(logging.INFO, logger=cpu_bgmv.__name__):
        assert cpu_bgmv.load_bgmv() is None
    assert "switched off" in caplog.text
    with pytest.raises(KernelUnavailable, match="disabled"):
        cpu_bgmv.load_bgmv_or_raise()
    monkeypatch.setenv("ADAPTERFORGE_CPU_KERNELS", "fast")
    with pytest.raises(KernelUnavailable, match="ADAPTERFORGE_CPU_KERNELS must be auto or off, not 'fast'"):
        cpu_bgmv.load_bgmv_or_raise()


def test_no_compiler_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    if _REASON is not None:
        pytest.skip(f"CPU kernel cannot run here: {_REASON}")
    cpu_bgmv.set_cache_dir(tmp_path / "kernels")  # nothing built there yet
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger=cpu_bgmv.__name__):
        assert cpu_bgmv.load_bgmv() is None
    assert "no C++ compiler found" in caplog.text and "use torch" in caplog.text


def test_a_failing_compiler_leaves_no_partial_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if _REASON is not None:
        pytest.skip(f"CPU kernel cannot run here: {_REASON}")
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'internal compiler error: out of luck' >&2\n: > \"$(eval echo \\${$(($#-1))})\"\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    cache = tmp_path / "kernels"
    cpu_bgmv.set_cache_dir(cache)
    with pytest.raises(KernelUnavailable, match="out of luck"):
        cpu_bgmv.load_bgmv_or_raise()
    assert list(cache.iterdir()) == []
    assert cpu_bgmv.load_bgmv() is None


@needs_kernel
def test_built_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "kernels"
    first = cpu_bgmv.build(cache)
    assert first.parent == cache and first.name.startswith("bgmv_cpu-") and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert cpu_bgmv.build(cache) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [first.name]
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no compiler: a built library is still found
    assert cpu_bgmv.build(cache) == first
    cpu_bgmv.set_cache_dir(cache)
    loaded = cpu_bgmv.load_bgmv()
    assert loaded is not None and loaded.path == first


def test_serving_gives_the_same_logits_with_or_without_the_kernel(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A prefill and a decode step, adapters of ranks 4, 8 and 13 and a base row in one batch: the logits
    with the kernel (reading the slot bank by slot id, no row buffers allocated), and with it switched
    off (torch: gathers from the bank, or row buffers for the decode step)."""
    from transformers import DynamicCache

    from adapters_core import AdapterModel, LoraConfig
    from adapters_core.peft_format import read_adapter
    from adapters_core.serving import SlottedModel
    from adapters_core.serving.layers import SlotLoraLayer
    from tests.conftest import load_model

    paths = []
    for i, (rank, targets) in enumerate([(4, "all-linear"), (8, ["q_proj", "v_proj"]), (13, "all-linear")]):
        torch.manual_seed(i)
        am = AdapterModel(load_model(model_dirs["llama"]))
        am.add_adapter("default", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for name, param in am.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        paths.append(tmp_path / f"r{rank}")
        am.save_pretrained(paths[-1])
    ids = torch.randint(3, 60, (5, 6), generator=torch.Generator().manual_seed(7))

    def decode(kernels: bool, row_capacity: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        """Prefill and decode logits, kernel calls per adapted layer, whether row buffers were allocated."""
        sm = SlottedModel(load_model(model_dirs["llama"]), 3, row_capacity=row_capacity, cpu_kernels=kernels)
        for slot, path in enumerate(paths, start=1):
            config, tensors = read_adapter(path)
            sm.load(slot, sm.prepare(config, tensors))
        calls = 0
        original = cpu_bgmv.BankCall.__call__

        def counting(self: cpu_bgmv.BankCall, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor,
                     highest: int) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return original(self, x, out, slots, highest)

        with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_bgmv.BankCall, "__call__", counting)
            cache = DynamicCache()
            with sm.route(rows):
                prefill = sm.model(input_ids=ids, cache=cache, use_cache=True).logits
            nxt = prefill[:, -1:].argmax(-1)
            sm.sync_rows(rows)
            with sm.route(rows):
                routing = sm.routing.current
                synced = routing is not None and routing.rows_synced
                logits = sm.model(input_ids=nxt, cache=cache, use_cache=True).logits
        layers = [m for m in sm.model.modules() if isinstance(m, SlotLoraLayer)]
        row_buffers = any(m.rows_a is not None for m in layers)
        assert synced == row_buffers
        return prefill, logits, calls / len(layers), row_buffers

    rows = [1, 3, 0, 2, 3]
    torch_prefill, torch_step, torch_calls, torch_rows = decode(False, 0, rows)
    rows_prefill, rows_step, rows_calls, rows_used = decode(False, 8, rows)
    prefill, step, kernel_calls, kernel_rows = decode(True, 8, rows)
    assert torch_calls == rows_calls == 0 and not torch_rows and rows_used
    # the kernel ran every layer's products in both forwards, and no row buffers were allocated for it
    assert (kernel_calls, kernel_rows) == ((2, False) if _REASON is None else (0, True))
    for got in (prefill, rows_prefill):
        torch.testing.assert_close(got, torch_prefill, rtol=0, atol=2e-5)
    for got in (step, rows_step):
        torch.testing.assert_close(got, torch_step, rtol=0, atol=2e-5)
    base_prefill, base_step, _, _ = decode(False, 0, [0] * len(rows))
    for i, slot in enumerate(rows):  # adapter rows really differ from the base model, base rows do not
        for got, base in ((prefill, base_prefill), (step, base_step)):
            effect = (got[i] - base[i]).abs().max().item()
            assert effect > 1e-3 if slot else effect <= 2e-5, (i, slot, effect)
