"""Compile the fused LoRA kernels' variants for CUDA GPUs on a machine without one (Triton's own ``ptxas``).

Triton's interpreter, which the tests run the kernels on, executes their Python semantics but none of
Triton's GPU code generation; this compiles the variants the server launches (the block sizes of
:mod:`adapters_core.serving.gpu_bgmv`, rank blocks and dtype pairs below) down to a cubin for each target,
so that a kernel that could not compile for a GPU fails here rather than on a server's first request.
Run as a script, in a process where ``TRITON_INTERPRET`` is unset (the test does that):

    python tests/core/compile_for_cuda.py --arch 90 --arch 80 --pair bfloat16:bfloat16 --block 16 --block 128

It prints one JSON object per variant (kernel, arch, dtypes, blocks, seconds, cubin bytes) and exits 1 if
any variant did not compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adapters_core.serving import gpu_bgmv_source
from adapters_core.serving.gpu_bgmv import decode_blocks, prefill_blocks

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
IN_FEATURES, OUT_FEATURES = 4096, 1024  # a 7B-class model's projection (its other shapes give the same blocks)


def _signature(kernel: Any, pointers: dict[str, str]) -> dict[str, str]:
    """Triton's signature of ``kernel``: the named pointers' element types, 32-bit ints, constexpr blocks."""
    params = kernel.arg_names
    return {name: f"*{pointers[name]}" if name in pointers else "constexpr" if name.startswith("BLOCK_") else "i32"
            for name in params}


def variants(dtype: str, weight_dtype: str, block_r: int) -> list[tuple[Any, dict[str, str], dict[str, int], int]]:
    """``(kernel, signature, constexprs, num_warps)`` of the decode step and the prefill's two kernels, as launched for
    products in ``dtype`` over a bank of ``weight_dtype`` at rank block ``block_r``."""
    x, w = _TYPES[dtype], _TYPES[weight_dtype]
    step = gpu_bgmv_source.compile_step()
    shrink, expand = gpu_bgmv_source.compile_prefill()
    block_k, block_n, warps = decode_blocks(IN_FEATURES, OUT_FEATURES, block_r)
    block_t, prefill_k, prefill_n, prefill_warps = prefill_blocks(IN_FEATURES, OUT_FEATURES, block_r)
    return [
        (step, _signature(step, {"x_ptr": x, "a_ptr": w, "b_ptr": w, "slots_ptr": "i64", "out_ptr": x}),
         {"BLOCK_K": block_k, "BLOCK_R": block_r, "BLOCK_N": block_n}, warps),
        (shrink, _signature(shrink, {"x_ptr": x, "a_ptr": w, "slots_ptr": "i64", "h_ptr": "fp32"}),
         {"BLOCK_T": block_t, "BLOCK_K": prefill_k, "BLOCK_R": block_r}, prefill_warps),
        (expand, _signature(expand, {"h_ptr": "fp32", "b_ptr": w, "slots_ptr": "i64", "out_ptr": x}),
         {"BLOCK_T": block_t, "BLOCK_R": block_r, "BLOCK_N": prefill_n}, prefill_warps),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", required=True, help="compute capability, e.g. 90")
    parser.add_argument("--pair", action="append", required=True,
                        help="products:weights dtypes, e.g. bfloat16:bfloat16 or float32:float16")
    parser.add_argument("--block", type=int, action="append", required=True, help="rank block (16, 32, ...)")
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        parser.error("TRITON_INTERPRET is set: Triton would not generate GPU code")
    failed = 0
    for arch in args.arch:
        for pair in args.pair:
            dtype, weight_dtype = pair.split(":")
            for block_r in args.block:
                for kernel, signature, constexprs, warps in variants(dtype, weight_dtype, block_r):
                    started = time.perf_counter()
                    record: dict[str, Any] = {"kernel": kernel.fn.__name__, "arch": arch, "dtype": dtype,
                                              "weight_dtype": weight_dtype, **constexprs, "num_warps": warps}
                    try:
                        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                                  target=GPUTarget("cuda", arch, 32),
                                                  options={"num_warps": warps, "enable_fp_fusion": True})
                        record["cubin_bytes"] = len(compiled.asm["cubin"])
                    except Exception as exc:  # reported, and the run fails
                        record["error"] = f"{exc.__class__.__name__}: {exc}"[:2000]
                        failed += 1
                    record["seconds"] = round(time.perf_counter() - started, 3)
                    print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
