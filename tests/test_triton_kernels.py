"""The Triton GEMMs against the PyTorch computations they stand for: `triton_fp8` (fc1, GELU (tanh) and the next
layer's FP8 quantize in one kernel) against `quantized.fp8_linear_gelu_quant` (the e4m3 rounding of the exact
result, tested in test_inductor.py), `triton_int8` against `quantized.int8_linear`'s integer arithmetic. On a GPU
the kernels themselves; without one, Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the mode is read
when kernels are defined) at fixed small blocks, since autotuning needs a GPU. All skip where Triton is not
installed (the CPU CI's torch brings none)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SHAPES = [(37, 256, 96), (5, 80, 40), (64, 1152, 128)]  # rows, K and N off the blocks' multiples: the masks
CASE = """
import json, sys, torch
from qandc.engines.quantized import fp8_linear_gelu_quant
m, k, n = {shape}
torch.manual_seed(m)
x = (torch.randn(m, k) * 4).to(torch.float8_e4m3fn)
w = (torch.randn(n, k) * 4).to(torch.float8_e4m3fn)
scale, bias, out_scale = torch.rand(n) * 1e-2, torch.randn(n).bfloat16(), torch.tensor(0.05)
want = fp8_linear_gelu_quant(x, w, scale, bias, out_scale).float()
"""
INTERPRETED = CASE + """
import triton
from qandc.engines import triton_fp8
got = torch.empty((m, n), dtype=torch.float8_e4m3fn)
blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)
grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
triton_fp8._fp8_gemm_gelu_quant_kernel.fn[grid](x, w, scale, bias, out_scale.reshape(1), got, m, n, k, **blocks,
                                                 PROMOTE={promote})
got = got.float()
"""
REPORT = """
step = torch.where(want.abs() < 2 ** -6, torch.full_like(want, 2 ** -9), 2 ** (torch.floor(torch.log2(want.abs())) - 3))
power = (want != 0) & (torch.log2(want.abs()) == torch.log2(want.abs()).round())
print(json.dumps({"shape": list(got.shape), "exact": (got == want).float().mean().item(),
                  "within_a_step": bool(((got - want).abs() <= step * 1.0001).all()),
                  "exact_but_interpreter_rounding": bool(((got == want) | (power & (got == want / 2))
                                                          | ((want.abs() <= 2 ** -6) & ((got - want).abs() <= 2 ** -8))
                                                          ).all())}))
"""


def stats(code: str, env: dict, lines: int = 1):
    """The JSON the last `lines` lines of `code`'s output hold (one object, or a list of `lines`)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()[-lines:]]
    return reports[0] if lines == 1 else reports


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test runs the kernel itself")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("promote", [True, False])
def test_the_kernel_computes_the_op_under_the_interpreter(shape, promote):
    """Exact, but for the interpreter's own float32 → e4m3 conversion (Triton 3.9; seen on a plain load-convert-store
    kernel too): where rounding carries into the exponent it gives half the value (just below 2^n → 2^(n-1)), and
    subnormals (to 2^-6) land up to two of their steps (2^-9) off. The interpreter accumulates in float32 either way:
    what the promotion changes on a GPU is `benchmarks/gemm_rates.py`'s to measure."""
    result = stats(INTERPRETED.format(shape=shape, promote=promote) + REPORT, {"TRITON_INTERPRET": "1"})
    assert result["shape"] == [shape[0], shape[2]] and result["exact_but_interpreter_rounding"]
    assert result["exact"] > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fast_accum", [False, True])
def test_the_kernel_computes_the_op_on_the_gpu(shape, fast_accum):
    """Within one e4m3 step of the exact result, plus what Hopper's FP8 tensor cores lose accumulating: they keep ~14
    bits of a running sum between float32 promotions. Seen on the H200 against the one-step bound alone: at K = 80
    1.5% of outputs off, at K = 256 some beyond a step, with the promotion every K block and without. So the bound
    adds 2^-12 of the sum of the products' magnitudes (times GELU's largest slope, 1.13) to the step; exact for
    nearly all outputs, with the promotion and without (`fast_accum`). Passed at all three shapes on the H200, with
    it (gpu-logs/kernels-h200-session7.log) and both ways (gpu-logs/kernels-h200-session10.log)."""
    code = CASE.format(shape=shape) + f"""
from qandc.engines.triton_fp8 import fp8_gemm_gelu_quant
got = fp8_gemm_gelu_quant(x.cuda(), w.cuda(), scale.cuda(), bias.cuda(), out_scale.cuda(),
                          fast_accum={fast_accum}).float().cpu()
magnitude = (x.float().abs() @ w.float().abs().t()) * scale / out_scale * 1.13
""" + REPORT + """
print(json.dumps({"within_accumulation": bool(((got - want).abs() <= step * 1.0001 + magnitude * 2 ** -12).all())}))
"""
    result, accumulation = stats(code, {}, lines=2)
    assert result["shape"] == [shape[0], shape[2]] and accumulation["within_accumulation"] and result["exact"] > 0.97


INT8 = """
import json, torch, triton
from qandc.engines.quantized import int8_linear
from qandc.engines import triton_int8
m, k, n = {shape}
torch.manual_seed(m)
x, w = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (n, k), dtype=torch.int8)
scale, bias = torch.rand(n) * 1e-3, torch.randn(n).bfloat16()
want = int8_linear(x, w, scale, bias).float()
got = torch.empty((m, n), dtype=torch.bfloat16)
grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
triton_int8._int8_gemm_kernel.fn[grid](x, w, scale, bias, got, m, n, k, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)
got = got.float()
"""
INT8_REPORT = """
close = (got - want).abs() <= want.abs() * 2 ** -7
print(json.dumps({"shape": list(got.shape), "within_bf16_step": bool(close.all()),
                  "exact": (got == want).float().mean().item()}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_inductor.py runs the INT8 kernel on the GPU")
@pytest.mark.parametrize("shape", SHAPES)
def test_the_int8_kernel_computes_integer_products_under_the_interpreter(shape):
    """Exact int32 products, scaled in float32; the interpreter truncates to bf16 where the GPU rounds to nearest
    (about half the outputs a bf16 step below, none further)."""
    result = stats(INT8.format(shape=shape) + INT8_REPORT, {"TRITON_INTERPRET": "1"})
    assert result["shape"] == [shape[0], shape[2]] and result["within_bf16_step"] and result["exact"] > 0.3
