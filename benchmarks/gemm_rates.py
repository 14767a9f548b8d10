"""GEMM rates at DiT-XL/2's shapes (batch 16 + CFG = 32 rows of 256 tokens): bf16 cuBLAS, FP8 `_scaled_mm` with and
without the float32 promotion of its running sum (`use_fast_accum`), `torch._int_mm` with a column-major weight plus
its dequantize, and qandc's Triton INT8 GEMM with the dequantize fused (`qandc::int8_linear`). At fc1's shape also
the MLP's middle both ways (issue 17): `_scaled_mm` then GELU + quantize compiled by Inductor (what the FP8 engines
run), and qandc's fused Triton kernel (`qandc::fp8_linear_gelu_quant`), autotuned and at each of its tile configs,
its persistent TMA-fed variant (autotuned), and cuBLASLt's GELU + bias epilogue with an e4m3 output (through
nvmath-python, where installed; the heuristic's algorithm and the fastest of its candidates); each with the
promotion and without (`use_fast_accum`, `fast_accum`), the last two also replayed in a CUDA graph; with the share
of e4m3 outputs equal to the exact result's (float64 GEMM) and the share off by more than one e4m3 step. Median of
`triton.testing.do_bench`; inputs random, never zeros. GPU only.

    python benchmarks/gemm_rates.py --out benchmarks/results/gemm-h200.json [--shapes fc1]
"""

import argparse
from functools import partial

import torch
import triton.testing

from _common import config_params
from qandc.artifacts import write_json
from qandc.errors import error_summary
from qandc.engines.quantized import int8_linear

SHAPES = {"qkv": (8192, 1152, 3456), "proj": (8192, 1152, 1152), "fc1": (8192, 1152, 4608),
          "fc2": (8192, 4608, 1152), "adaLN": (32, 1152, 6912)}

# the MLP's middle timed in a CUDA graph too (the nvmath call's Python costs more than its kernel's time)
GRAPHED = {f"{name}{suffix}" for name in ("fp8_triton_tma_gelu_quant", "fp8_cublaslt_gelu_quant",
                                           "fp8_cublaslt_autotuned_gelu_quant") for suffix in ("", "_fast_accum")}


def rates(m: int, k: int, n: int) -> dict:
    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    ai = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    bi = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    one, scale = torch.tensor(1.0, device="cuda"), torch.rand(n, device="cuda") * 1e-3
    bias = torch.randn(n, device="cuda").bfloat16()
    kernels = {
        "bf16": lambda: torch.nn.functional.linear(a16, b16, bias),
        "fp8_scaled_mm": lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, bias=bias,
                                                  out_dtype=torch.bfloat16),
        "fp8_scaled_mm_fast_accum": lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, bias=bias,
                                                             out_dtype=torch.bfloat16, use_fast_accum=True),
        "int8_int_mm_plus_dequant": lambda: (torch._int_mm(ai, bi.t()) * scale + bias).bfloat16(),
        "int8_triton_fused": lambda: int8_linear(ai, bi, scale, bias),
    }
    out = {}
    if (m, k, n) == SHAPES["fc1"]:
        fused, out["fp8_gelu_quant_accuracy"] = fused_mlp_kernels(a8, b8, scale, bias)
        kernels.update(fused)
    expected = (ai.double() @ bi.double().t()) * scale.double() + bias.double()
    out["int8_triton_rel_err"] = float((int8_linear(ai, bi, scale, bias).double() - expected).norm() / expected.norm())
    for name, fn in kernels.items():
        try:
            ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
        except Exception as e:  # a tile config this card cannot run (shared memory, registers): recorded, not fatal
            out[name] = {"error": error_summary(e)}
            continue
        out[name] = {"us": ms * 1e3, "tflops": 2 * m * k * n / (ms * 1e-3) / 1e12}
        if name.startswith("fp8_triton_tma"):  # the tile autotuning chose (the epilogue whole or in halves)
            from qandc.engines import triton_fp8

            out[name]["config"] = config_params(triton_fp8._fp8_gemm_gelu_quant_tma_kernel.best_config)
        if name in GRAPHED:  # replayed as the engines run it: no launch cost, and capture-safe or an error
            try:
                out[name]["us_cuda_graph"] = triton.testing.do_bench_cudagraph(fn, rep=200,
                                                                              return_mode="median") * 1e3
            except Exception as e:
                out[name]["cuda_graph_error"] = error_summary(e)
    return out


def fused_mlp_kernels(a8: torch.Tensor, b8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> tuple:
    """fc1 + GELU + fc2's activation quantize: cuBLASLt then an Inductor kernel, and the fused Triton kernel
    (autotuned, then each config alone) and its persistent TMA variant (autotuned), each promoting the running sum
    and not; (the kernels, their accuracy)."""
    import triton

    from qandc.engines import triton_fp8
    from qandc.engines.quantized import to_fp8

    (m, k), n = a8.shape, b8.shape[0]
    weight_scale = scale.mean()  # per tensor, as the FP8 engines' `_scaled_mm` (the fused kernel takes it per channel)
    scale, one = weight_scale.expand(n).contiguous(), torch.tensor(1.0, device="cuda")
    out_scale = torch.tensor(0.05, device="cuda")
    gelu_quant = torch.compile(lambda h: to_fp8(torch.nn.functional.gelu(h, approximate="tanh"), out_scale))
    out = torch.empty((m, n), dtype=torch.float8_e4m3fn, device="cuda")
    kernels = {}
    for fast in (False, True):
        suffix = "_fast_accum" if fast else ""
        kernels[f"fp8_scaled_mm_then_gelu_quant{suffix}"] = lambda fast=fast: gelu_quant(torch._scaled_mm(
            a8, b8.t(), scale_a=one, scale_b=weight_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast))
        kernels[f"fp8_triton_gelu_quant{suffix}"] = lambda fast=fast: triton_fp8.fp8_gemm_gelu_quant(
            a8, b8, scale, bias, out_scale, fast_accum=fast)
        kernels[f"fp8_triton_tma_gelu_quant{suffix}"] = lambda fast=fast: triton_fp8.fp8_gemm_gelu_quant(
            a8, b8, scale, bias, out_scale, fast_accum=fast, tma=True)
        for config in triton_fp8._CONFIGS:
            blocks = config.kwargs
            grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
            name = "fp8_triton_gelu_quant_{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**blocks) + \
                f"_s{config.num_stages}_w{config.num_warps}{suffix}"
            kernels[name] = lambda grid=grid, config=config, fast=fast: triton_fp8._fp8_gemm_gelu_quant_kernel.fn[
                grid](a8, b8, scale, bias, out_scale.reshape(1), out, m, n, k, **config.kwargs, PROMOTE=not fast,
                      num_stages=config.num_stages, num_warps=config.num_warps)
    kernels.update(cublaslt_kernels(a8, b8, weight_scale, bias, out_scale))
    exact = torch.nn.functional.gelu((a8.float().double() @ b8.float().double().t()) * scale.double()
                                     + bias.double(), approximate="tanh") / out_scale.double()
    want = exact.clamp(-448, 448).float().to(torch.float8_e4m3fn).float()
    step = torch.where(want.abs() < 2 ** -6, torch.full_like(want, 2 ** -9),
                       2 ** (torch.floor(torch.log2(want.abs())) - 3))  # e4m3's spacing at each value
    accuracy = {}
    for name in ("fp8_scaled_mm_then_gelu_quant", "fp8_triton_gelu_quant", "fp8_triton_tma_gelu_quant",
                 "fp8_cublaslt_gelu_quant", "fp8_cublaslt_autotuned_gelu_quant"):
        for suffix in ("", "_fast_accum"):
            if name + suffix not in kernels:
                continue
            got = kernels[name + suffix]().float()
            accuracy[name + suffix] = {"exact_share": (got == want).float().mean().item(),
                                       "beyond_one_step_share": ((got - want).abs() > step * 1.0001).float().mean()
                                       .item()}
    return kernels, accuracy


def cublaslt_kernels(a8, b8, weight_scale, bias, out_scale) -> dict:
    """fc1 + GELU + quantize as the FP8 engines' one cuBLASLt call (`cublaslt_fp8.fp8_gemm_gelu_quant`: nvmath-python,
    per-tensor scales, the GELU + bias epilogue, e4m3 output), each promoting and not, with the algorithm cuBLASLt's
    heuristic puts first and with the fastest of its candidates timed (`cublaslt_fp8.AUTOTUNE`, "_autotuned"); {}
    where it cannot run."""
    from qandc.engines import cublaslt_fp8

    if not cublaslt_fp8.usable(a8, b8):
        print("no cuBLASLt rows: nvmath-python is not importable or the GPU is older than compute capability 8.9",
              flush=True)
        return {}
    kernels, inverse, engines_choice = {}, 1 / out_scale, cublaslt_fp8.AUTOTUNE

    def call(fast: bool, autotune: bool):
        cublaslt_fp8.AUTOTUNE = autotune  # part of the plan's key: each call runs its own plan
        try:
            return cublaslt_fp8.fp8_gemm_gelu_quant(a8, b8, weight_scale, bias, inverse, fast)
        finally:
            cublaslt_fp8.AUTOTUNE = engines_choice

    for autotune in (False, True):
        for fast in (False, True):
            try:
                call(fast, autotune)  # plans it
            except cublaslt_fp8.Unsupported as e:  # what cuBLASLt refuses here, in the log; the other rows still run
                print(f"no cuBLASLt row (fast accumulation {fast}, autotuned {autotune}): {e}", flush=True)
                continue
            name = "fp8_cublaslt" + ("_autotuned" if autotune else "") + "_gelu_quant" + ("_fast_accum" if fast else "")
            kernels[name] = partial(call, fast, autotune)
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES), help="the shapes to time")
    args = parser.parse_args()
    results = {name: {"shape_mkn": list(SHAPES[name]), **rates(*SHAPES[name])} for name in args.shapes}
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": results})
    print(f"{'shape':6s} " + " ".join(f"{k:>26s}" for k in ("bf16", "fp8_scaled_mm", "int8_int_mm_plus_dequant",
                                                            "int8_triton_fused")))
    for name, r in results.items():
        print(f"{name:6s} " + " ".join(f"{r[k]['us']:9.1f} us {r[k]['tflops']:7.0f} TF  " for k in
                                       ("bf16", "fp8_scaled_mm", "int8_int_mm_plus_dequant", "int8_triton_fused")))
    for kernel, r in results.get("fc1", {}).items():
        if kernel.startswith("fp8_") and kernel != "fp8_gelu_quant_accuracy":
            print(f"fc1 {kernel:55s} " + (f"{r['us']:9.1f} us {r['tflops']:7.0f} TF" if "us" in r else r["error"]))
    for kernel, r in results.get("fc1", {}).get("fp8_gelu_quant_accuracy", {}).items():
        print(f"fc1 {kernel:55s} exact {r['exact_share']:.4f}, beyond one e4m3 step {r['beyond_one_step_share']:.2e}")


if __name__ == "__main__":
    main()
