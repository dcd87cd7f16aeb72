"""The fused GPU decode-step kernel (Triton), run here on CPU tensors by Triton's interpreter.

Its products are checked against float64 ``bmm`` on gathered weights for shapes that take every part
of the kernel: inputs longer than one ``BLOCK_K`` tile, outputs spanning several ``BLOCK_N`` programs,
rank widths below the bank's capacity and not a power of two, base-model rows (slot 0), strided ``x``
and ``out``, and weights stored in another dtype than the products'. Its availability is checked too:
switched off, not installed, or asked for where it cannot run. And, since the interpreter skips
Triton's GPU code generation, every variant is compiled to a cubin for sm_90 and sm_80.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_core import ConfigError
from adapters_core.serving import SlottedModel, gpu_bgmv
from adapters_core.serving.gpu_bgmv import GpuBgmv, KernelUnavailable, load_gpu_bgmv, load_gpu_bgmv_or_raise

pytest.importorskip("triton", reason="the GPU kernel is written in Triton")


@pytest.fixture(scope="module")
def kernel() -> GpuBgmv:
    loaded = load_gpu_bgmv_or_raise()
    if not loaded.interpret:
        pytest.skip("Triton is not in its interpreter (TRITON_INTERPRET=1 before Triton's first import)")
    return loaded


def reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, width: int,
              out: torch.Tensor) -> torch.Tensor:
    """``out + (x @ A[s][:, :width]) @ B[s][:width]`` in float64."""
    h = torch.bmm(x.double(), a.index_select(0, slots)[:, :, :width].double())
    return out.double() + torch.bmm(h, b.index_select(0, slots)[:, :width].double())


def bank(slots: int, in_features: int, rank: int, out_features: int, dtype: torch.dtype,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(slots, in_features, rank, generator=generator).to(dtype)
    b = torch.randn(slots, rank, out_features, generator=generator).to(dtype)
    a[0], b[0] = 0, 0  # slot 0: the base model
    return a, b


@pytest.mark.parametrize("tokens", [1, 2, 37], ids=lambda t: f"{t}-tokens")  # a decode step; prefills
@pytest.mark.parametrize(("in_features", "out_features", "capacity", "width"), [
    (300, 600, 16, 16),  # three BLOCK_K tiles; three BLOCK_N programs per row, the last one partial
    (300, 600, 16, 5),  # fewer rank columns than the bank holds, not a power of two
    (40, 24, 64, 48),  # one partial tile each way; a wide rank (smaller tiles)
    (1, 7, 2, 1),
])
def test_step_adds_each_rows_own_adapter_product(kernel: GpuBgmv, in_features: int, out_features: int,
                                                 capacity: int, width: int, tokens: int) -> None:
    generator = torch.Generator().manual_seed(in_features * 1000 + width)
    a, b = bank(5, in_features, capacity, out_features, torch.float32, generator)
    slots = torch.tensor([3, 0, 1, 4, 3, 2])
    x = torch.randn(len(slots), tokens, in_features, generator=generator)
    out = torch.randn(len(slots), tokens, out_features, generator=generator)
    before, launches = out.clone(), kernel.launches
    want = reference(x, a, b, slots, width, out)
    got = kernel.step(x, a, b, slots, width, out)
    assert got is out and kernel.launches == launches + (1 if tokens == 1 else 2)  # in place; a prefill: 2 launches
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[1], before[1])  # the base row: nothing added (its slot holds zeros)
    if width < capacity:  # the columns past ``width`` are not read: poisoning them changes nothing
        a[:, :, width:], b[:, width:] = float("nan"), float("nan")
        assert torch.equal(kernel.step(x, a, b, slots, width, before.clone()), got)


@pytest.mark.parametrize("tokens", [1, 5])
def test_step_reads_rows_of_wider_tensors_and_writes_into_views(kernel: GpuBgmv, tokens: int) -> None:
    generator = torch.Generator().manual_seed(7)
    a, b = bank(4, 200, 8, 130, torch.float32, generator)
    slots = torch.tensor([2, 1, 3])
    wide_x = torch.randn(3, 2 * tokens, 400, generator=generator)
    x = wide_x[:, ::2, 100:300]  # rows and tokens apart
    wide_out = torch.randn(3, tokens, 2, 130, generator=generator)
    out = wide_out[:, :, 1]  # one of two positions per token
    untouched = wide_out[:, :, 0].clone()
    assert kernel.accepts(x, out)
    want = reference(x, a, b, slots, 8, out)
    kernel.step(x, a, b, slots, 8, out)
    assert torch.allclose(wide_out[:, :, 1].double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(wide_out[:, :, 0], untouched)
    # features apart, or a bank that is a view, are refused (the torch path takes those)
    assert not kernel.accepts(wide_x[:, ::2, ::2], out)
    with pytest.raises(ValueError, match="unit feature strides"):
        kernel.step(wide_x[:, ::2, ::2], a, b, slots, 8, out)
    with pytest.raises(ValueError, match="contiguous banks"):
        kernel.step(x, a[:, :, :4], b[:, :4], slots, 4, out)


@pytest.mark.parametrize(("products", "weights"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                                   (torch.float16, torch.float16)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_step_widens_weights_and_rounds_once(kernel: GpuBgmv, products: torch.dtype, weights: torch.dtype,
                                             tokens: int) -> None:
    """16-bit weights are widened as they are loaded and everything is summed in float32: the result is the
    float64 answer on those weights, rounded once to ``out``'s dtype (within a few float32 roundings)."""
    generator = torch.Generator().manual_seed(11)
    a, b = bank(3, 256, 16, 300, weights, generator)
    slots = torch.tensor([1, 2, 2, 0])
    x = torch.randn(len(slots), tokens, 256, generator=generator).to(products)
    out = torch.randn(len(slots), tokens, 300, generator=generator).to(products)
    want = reference(x, a, b, slots, 16, out)
    got = kernel.step(x, a, b, slots, 16, out.clone())
    assert got.dtype == products
    rounded = want.to(products).double()
    ulp = (rounded - want).abs().max().item()  # one rounding to the output dtype, at most
    assert (got.double() - want).abs().max().item() <= 2 * ulp + 1e-3


def _cuda_codegen_reason() -> str | None:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        return f"Triton has no CUDA backend here ({exc})"
    return None


@pytest.mark.skipif(_cuda_codegen_reason() is not None, reason=str(_cuda_codegen_reason()))
@pytest.mark.parametrize(("arch", "pairs"), [
    (90, ["bfloat16:bfloat16", "float16:float16", "float32:float32", "float32:float16"]),  # Hopper: each pair served
    (80, ["bfloat16:bfloat16"]),  # Ampere
], ids=["sm_90", "sm_80"])
def test_every_variant_compiles_for_cuda_gpus(arch: int, pairs: list[str], tmp_path: Path) -> None:
    """The interpreter runs the kernels' Python semantics, not Triton's GPU code generation: every variant the
    server launches (rank blocks 16 to 128, products:weights dtype pairs) must compile to a cubin for real
    GPUs, here, without one (tests/core/compile_for_cuda.py, in a process without ``TRITON_INTERPRET``, with
    an empty Triton cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_DEFAULT_FP_FUSION="1")
    args = [sys.executable, str(Path(__file__).with_name("compile_for_cuda.py")), f"--arch={arch}",
            *(f"--pair={p}" for p in pairs), *(f"--block={b}" for b in (16, 32, 64, 128))]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in records if "error" in r]
    assert done.returncode == 0 and not errors, (errors or done.stderr[-3000:])
    assert len(records) == len(pairs) * 4 * 3  # dtype pairs x rank blocks x kernels
    assert {r["kernel"] for r in records} == {"bgmv_step", "sgmv_shrink", "sgmv_expand"}
    assert all(r["arch"] == arch and r["cubin_bytes"] > 0 for r in records)


def test_accepts_rows_of_tokens_on_its_device(kernel: GpuBgmv) -> None:
    x, out = torch.zeros(4, 1, 8), torch.zeros(4, 1, 6)
    assert kernel.accepts(x, out) and kernel.accepts(torch.zeros(4, 3, 8), torch.zeros(4, 3, 6))
    assert not kernel.accepts(x, torch.zeros(3, 1, 6))  # other rows
    assert not kernel.accepts(x, torch.zeros(4, 2, 6))  # other tokens
    assert not kernel.accepts(x.view(4, 8), out.view(4, 6))


def test_switched_off_by_the_setting(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ADAPTERFORGE_GPU_KERNELS", "off")
    load_gpu_bgmv.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=gpu_bgmv.__name__):
            assert load_gpu_bgmv() is None
        assert "ADAPTERFORGE_GPU_KERNELS=off" in caplog.text
        with pytest.raises(KernelUnavailable, match="disabled"):
            load_gpu_bgmv_or_raise()
        monkeypatch.setenv("ADAPTERFORGE_GPU_KERNELS", "maybe")
        with pytest.raises(KernelUnavailable, match="auto, on or off, not 'maybe'"):
            load_gpu_bgmv_or_raise()
    finally:
        load_gpu_bgmv.cache_clear()


def test_without_triton_the_reason_is_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import adapters_core.serving

    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # ``import triton`` now fails
    monkeypatch.delitem(sys.modules, "adapters_core.serving.gpu_bgmv_source", raising=False)
    monkeypatch.delattr(adapters_core.serving, "gpu_bgmv_source", raising=False)
    monkeypatch.setattr(gpu_bgmv, "_compiled", functools.cache(gpu_bgmv._compiled.__wrapped__))  # not yet built
    load_gpu_bgmv.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=gpu_bgmv.__name__):
            assert load_gpu_bgmv() is None
        assert "Triton is not installed" in caplog.text
    finally:
        load_gpu_bgmv.cache_clear()


def test_asked_for_where_it_cannot_run_is_an_error(kernel: GpuBgmv, monkeypatch: pytest.MonkeyPatch,
                                                    tiny_llama_dir: Any) -> None:
    from tests.conftest import load_model

    model = load_model(tiny_llama_dir)
    assert SlottedModel(model, 2, gpu_kernels=True).gpu_kernel is kernel  # the interpreter, on a CPU model
    assert SlottedModel(model, 2).gpu_kernel is None  # by default only on CUDA devices
    # float32 products on a bfloat16 model (ADAPTERFORGE_ADAPTER_DTYPE=float32) run on torch: the kernel is refused
    # rather than held unused (``/readyz`` would name it)
    with pytest.raises(ConfigError, match=r"products are in the model's dtype \(torch.bfloat16\), not torch.float32"):
        SlottedModel(load_model(tiny_llama_dir).to(torch.bfloat16), 2, dtype=torch.float32, gpu_kernels=True)
    monkeypatch.setattr(kernel, "interpret", False)  # a kernel compiled for GPUs, asked for on a CPU model
    with pytest.raises(ConfigError, match="runs on a GPU, but the model is on cpu"):
        SlottedModel(model, 2, gpu_kernels=True)


def test_prefill_token_offsets_past_2_31_elements_are_right(kernel: GpuBgmv) -> None:
    """Token t of a row sits t x features elements in: past 2**31 (60k tokens of a 35,840-wide layer) an int32
    offset wrapped, reading x from 4 GiB before it and writing the product there. Views with a token stride of
    2**28 put token 8 at exactly 2**31, in storage that is virtual memory, never touched but for these rows."""
    in_f, out_f, rank, tokens, stride = 16, 16, 16, 9, 2 ** 28
    g = torch.Generator().manual_seed(0)
    a, b = bank(2, in_f, rank, out_f, torch.float16, g)
    slots = torch.tensor([1])
    store = torch.empty(2 ** 32 + 64, dtype=torch.float16)  # 8 GiB of address space
    x = store.as_strided((1, tokens, in_f), (tokens * stride, stride, 1), storage_offset=2 ** 31)
    for t in range(tokens):
        x[0, t] = torch.randn(in_f, generator=g).to(torch.float16)
    store[:in_f] = 0.0  # where a wrapped offset lands
    out = torch.randn(1, tokens, out_f, generator=g).to(torch.float16)
    want = reference(x, a, b, slots, rank, out)
    got = kernel.step(x, a, b, slots, rank, out.clone())
    assert (got.double() - want).abs().max() < 0.1
    del x
    out = store.as_strided((1, tokens, out_f), (tokens * stride, stride, 1), storage_offset=2 ** 31)
    for t in range(tokens):
        out[0, t] = torch.randn(out_f, generator=g).to(torch.float16)
    store[:out_f] = 0.0
    x = torch.randn(1, tokens, in_f, generator=g).to(torch.float16)
    want = reference(x, a, b, slots, rank, out)
    kernel.step(x, a, b, slots, rank, out)
    assert (out.double() - want).abs().max() < 0.1
    assert not store[:out_f].any()  # nothing written 2**31 elements before `out`


def test_only_a_variant_that_never_ran_switches_the_kernel_off_when_it_fails(kernel: GpuBgmv,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient fault (out of memory for the prefill's scratch) failed the step and switched the kernel off for
    the rest of the process: every later step ran on torch's slower operators. A variant that has run is
    compiled: its faults are the step's; a new variant that fails is one Triton cannot build here."""
    own = GpuBgmv(kernel._kernel, kernel._prefill_kernel, kernel.interpret)
    x, out = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    a, b = torch.zeros(1, 8, 16), torch.zeros(1, 16, 8)
    slots = torch.zeros(1, dtype=torch.long)
    own.step(x, a, b, slots, 16, out)  # this variant runs

    def fail(error: BaseException) -> None:
        def launch(*args: Any) -> None:
            raise error
        monkeypatch.setattr(own, "_launch", launch)

    for transient in (torch.OutOfMemoryError("CUDA out of memory (injected)"), RuntimeError("illegal address")):
        fail(transient)
        with pytest.raises(type(transient)):
            own.step(x, a, b, slots, 16, out)
        assert own.failure is None and own.accepts(x, out)
    fail(RuntimeError("PassManager::run failed"))  # (what Triton raises when it cannot compile)
    with pytest.raises(KernelUnavailable, match="PassManager"):
        own.step(x[:, :1], a, b, slots, 16, out[:, :1])  # a decode step: a variant that never ran
    assert own.failure is not None and not own.accepts(x, out)
    fresh = GpuBgmv(kernel._kernel, kernel._prefill_kernel, kernel.interpret)
    monkeypatch.setattr(fresh, "_launch", lambda *args: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")))
    with pytest.raises(torch.OutOfMemoryError):  # (out of memory is never the kernel's fault)
        fresh.step(x, a, b, slots, 16, out)
    assert fresh.failure is None


def test_auto_leaves_the_interpreter_alone_on_a_gpu_host(kernel: GpuBgmv, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture, tiny_llama_dir: Any) -> None:
    """TRITON_INTERPRET=1 left set on a GPU host: the interpreter takes no CUDA tensors, so `auto` must not report
    the kernel in use (every step would silently run on torch)."""
    from adapters_core.serving.slotted import SlottedModel as Slotted
    from tests.conftest import load_model

    slotted = Slotted(load_model(tiny_llama_dir), 2)
    monkeypatch.setattr(slotted, "device", torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger="adapters_core.serving.slotted"):
        assert slotted._gpu_kernel(None, torch.float32) is None
    assert "TRITON_INTERPRET" in caplog.text


def test_a_model_served_on_the_cpu_pins_no_host_memory_on_a_machine_with_a_gpu(
        monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Any, tmp_path: Path) -> None:
    """Pinning depended on `torch.cuda.is_available()`, not on the model's device: an API serving on the CPU next
    to GPU workers page-locked its host tier (and made a CUDA context); on a CPU build it failed outright."""
    from peft import LoraConfig, get_peft_model

    from adapters_core.peft_format import read_adapter
    from tests.conftest import load_model

    get_peft_model(load_model(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    prepared = SlottedModel(load_model(tiny_llama_dir), 2).prepare(*read_adapter(tmp_path))
    assert prepared.layers and not any(w.a.is_pinned() or w.b.is_pinned() for w in prepared.layers.values())
