"""Whether DiT-XL/2's attention should run in FP8 (issue 17): what the FP8 engines run between the qkv and the
output projection's GEMMs now — cuDNN's bf16 attention on q, k, v viewed out of the qkv GEMM's bf16 output, then
Inductor's quantize of its output for the projection (1.49 ms of the 9.46 ms step, session 28) — against cuDNN's FP8
attention (cudnn-frontend's `sdpa_fp8`): e4m3 q, k, v with per-tensor descales, the probabilities as e4m3 (scale
256), the output written as e4m3 with the projection's input scale, so that no quantize is left. cuDNN takes FP8
heads of a multiple of 16, so the heads are padded 72 -> 80; the padding would cost no kernel of its own where the
qkv GEMM writes e4m3 padded heads (its weight with zero rows, `_scaled_mm`'s `scale_result`) and the projection
reads them (its weight with zero columns): those GEMMs are timed against the engines' too, and a separate quantize +
pad kernel for the case where the GEMM cannot. Each row: µs a call, `do_bench` and replayed in a CUDA graph (the
engines' way), or its error; the outputs' relative L2 error to the float32 attention (q, k, v quantized by one scale
each, and by one scale for all three: what a single GEMM's `scale_result` gives). `ms_per_step`: each chain's ms
a step (28 blocks, CUDA-graph times). Random bf16 inputs (speed, and the arithmetic's error only: the
model's quality needs the reference model's FD). GPU only, with nvidia-cudnn-frontend (1.16, in the GPU bundle).

    python benchmarks/fp8_attention.py --out benchmarks/results/fp8-attention-h200.json
"""

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from _common import cuda_graph_us
from attention_rates import BATCH, BLOCKS, HEAD_DIM, HEADS, TOKENS, heads
from qandc.artifacts import write_json
from qandc.engines.quantized import FP8_MAX, to_fp8
from qandc.errors import error_summary

PADDED = 80  # DiT-XL/2's heads of 72 (attention_rates.py's shapes), padded to a multiple of 16
ROWS, WIDTH = BATCH * TOKENS, HEADS * HEAD_DIM
E4M3 = torch.float8_e4m3fn
S_SCALE = 256.0  # the probabilities (at most 1) as e4m3: 256 at most, 2^-9 · 256 resolved near 0


def timed(call) -> dict:
    """µs of `call` a call: `do_bench` and replayed in a CUDA graph."""
    return {"us": triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3,
            "us_cuda_graph": cuda_graph_us(call)}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want|, L2 over every element."""
    return ((got.float() - want).norm() / want.norm()).item()


def padded_heads(qkv: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 [B, T, 3, H, 80] of bf16 qkv [B, T, 3 H 72], each of q, k, v divided by its scale, zero past 72."""
    padded = F.pad(qkv.float().reshape(BATCH, TOKENS, 3, HEADS, HEAD_DIM), (0, PADDED - HEAD_DIM))
    return to_fp8(padded, scales.reshape(1, 1, 3, 1, 1))


class CudnnFp8Attention:
    """cuDNN's FP8 attention over e4m3 [B, T, 3, H, 80] (q, k, v side by side, as a padded qkv GEMM writes them)
    into e4m3 [B, T, H, 80], the softmax scale that of 72-wide heads."""

    def __init__(self):
        import cudnn

        self.cudnn, self.handle = cudnn, cudnn.create_handle()
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        dims, qkv_strides = (BATCH, HEADS, TOKENS, PADDED), (TOKENS * 3 * HEADS * PADDED, PADDED, 3 * HEADS * PADDED, 1)
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=qkv_strides, data_type=fp8) for n in "qkv")
        self.scalars = {n: graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
                        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, **self.scalars, is_inference=True,
                                              attn_scale=1 / math.sqrt(HEAD_DIM))
        o.set_output(True).set_dim(dims).set_stride((TOKENS * HEADS * PADDED, PADDED, HEADS * PADDED, 1))
        o.set_data_type(fp8)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.o, self.amax_s, self.amax_o = graph, o, amax_s, amax_o
        self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
        self.out = torch.empty(BATCH, TOKENS, HEADS, PADDED, dtype=E4M3, device="cuda")
        self.amaxes = torch.empty(2, dtype=torch.float32, device="cuda")

    def bind(self, heads: torch.Tensor, scales: torch.Tensor, o_scale: torch.Tensor):
        """A call of the attention over `heads` (`padded_heads(qkv, scales)`) whose output is divided by `o_scale`
        (the projection's input scale): every tensor it passes made here, none in the call (a CUDA graph captures
        it), the output into one buffer."""
        values = {"descale_q": scales[0], "descale_k": scales[1], "descale_v": scales[2],
                  "descale_s": torch.tensor(1 / S_SCALE), "scale_s": torch.tensor(S_SCALE), "scale_o": 1 / o_scale}
        pack = {self.q: heads[:, :, 0], self.k: heads[:, :, 1], self.v: heads[:, :, 2], self.o: self.out,
                self.amax_s: self.amaxes[0:1], self.amax_o: self.amaxes[1:2],
                **{self.scalars[n]: v.float().reshape(1).to("cuda").contiguous() for n, v in values.items()}}

        def call() -> torch.Tensor:
            self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
            self.graph.execute(pack, self.workspace, handle=self.handle)
            return self.out
        return call


def attention_rows(qkv: torch.Tensor, results: dict) -> dict:
    """The attention rows into `results`; their outputs' relative errors to the float32 attention, by row (the
    one-scale row: q, k, v quantized by one scale, timed as the other)."""
    q, k, v = heads(qkv, 0)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2).reshape(ROWS, WIDTH)
    o_scale = want.abs().amax() / FP8_MAX  # the projection's input scale, as calibration would set it
    quantize = torch.compile(lambda o: to_fp8(o.transpose(1, 2).reshape(ROWS, WIDTH), o_scale))

    def cudnn_bf16_then_quantize():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return quantize(F.scaled_dot_product_attention(q, k, v))

    calls = {"cudnn_bf16_then_quantize": (cudnn_bf16_then_quantize, lambda out: out.float() * o_scale)}
    amax = qkv.float().reshape(ROWS, 3, WIDTH).abs().amax(dim=(0, 2))
    own, shared = amax / FP8_MAX, amax.max().expand(3) / FP8_MAX  # a scale for each of q, k, v / one for all
    results["quantize_pad_qkv"] = timed(torch.compile(lambda: padded_heads(qkv, own)))
    try:
        fp8 = CudnnFp8Attention()
    except Exception as e:  # no cudnn-frontend, a cuDNN without FP8 attention for these shapes, ...
        results["cudnn_fp8"] = {"error": error_summary(e)}
    else:
        dequantized = lambda out: out[..., :HEAD_DIM].float().reshape(ROWS, WIDTH) * o_scale  # noqa: E731
        calls["cudnn_fp8"] = (fp8.bind(padded_heads(qkv, own), own, o_scale), dequantized)
        calls["cudnn_fp8_one_scale"] = (fp8.bind(padded_heads(qkv, shared), shared, o_scale), dequantized)
    errors = {}
    for name, (call, dequantize) in calls.items():
        try:
            errors[name] = relative_error(dequantize(call()), want)
            results[name] = timed(call)
        except Exception as e:
            results[name] = {"error": error_summary(e)}
    return errors


def gemm_rows(results: dict) -> None:
    """The qkv and output projections as the engines run them (bf16 out) and padded (e4m3 padded heads out;
    reading them), into `results`."""
    one = torch.tensor(1.0, device="cuda")
    x = torch.randn(ROWS, WIDTH, device="cuda").to(E4M3)
    padded_x = torch.randn(ROWS, HEADS * PADDED, device="cuda").to(E4M3)
    shapes = {"qkv_gemm": (x, 3 * WIDTH, torch.bfloat16), "qkv_gemm_padded_fp8_out": (x, 3 * HEADS * PADDED, E4M3),
              "proj_gemm": (x, WIDTH, torch.bfloat16), "proj_gemm_padded": (padded_x, WIDTH, torch.bfloat16)}
    for name, (a, n, out_dtype) in shapes.items():
        w = torch.randn(n, a.shape[1], device="cuda").to(E4M3)
        bias = torch.randn(n, device="cuda").bfloat16()
        extra = {"scale_result": one} if out_dtype == E4M3 else {}
        for suffix, b in (("", bias), ("_no_bias", None)):
            call = lambda w=w, b=b, a=a, out_dtype=out_dtype, extra=extra: torch._scaled_mm(  # noqa: E731
                a, w.t(), scale_a=one, scale_b=one, bias=b, out_dtype=out_dtype, use_fast_accum=True, **extra)
            try:
                call()
                results[name + suffix] = timed(call)
            except Exception as e:  # cuBLASLt's FP8 output with a bias, where it refuses
                results[name + suffix] = {"error": error_summary(e)}
            if "error" not in results[name + suffix]:
                break


def per_step(results: dict) -> dict:
    """ms a step of the chains, from the CUDA-graph times: the engines' now, FP8 attention fed by the padded GEMM,
    and fed by a quantize + pad kernel after the engines' qkv GEMM."""
    def us(name):
        for row in (name, name + "_no_bias"):
            if "us_cuda_graph" in results.get(row, {}):
                return results[row]["us_cuda_graph"]
        return None
    chains = {"engines": ("qkv_gemm", "cudnn_bf16_then_quantize", "proj_gemm"),
              "fp8_padded_gemms": ("qkv_gemm_padded_fp8_out", "cudnn_fp8", "proj_gemm_padded"),
              "fp8_quantize_kernel": ("qkv_gemm", "quantize_pad_qkv", "cudnn_fp8", "proj_gemm_padded")}
    times = {name: [us(row) for row in rows] for name, rows in chains.items()}
    return {name: sum(t) * BLOCKS / 1e3 for name, t in times.items() if None not in t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    qkv = (torch.randn(BATCH, TOKENS, 3 * WIDTH, device="cuda") * 1.5).bfloat16()
    results = {}
    errors = attention_rows(qkv, results)
    gemm_rows(results)
    try:
        import cudnn

        cudnn_version = cudnn.backend_version_string()
    except Exception as e:
        cudnn_version = error_summary(e)
    steps = per_step(results)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": cudnn_version,
                          "shape_bthd": [BATCH, TOKENS, HEADS, HEAD_DIM], "padded_head_dim": PADDED,
                          "rows": results, "relative_error": errors, "ms_per_step": steps})
    for name, r in results.items():
        print(f"{name:32s} " + (f"{r['us']:7.1f} us  in a CUDA graph {r['us_cuda_graph']:7.1f} us" if "us" in r
                                else r["error"]))
    for name, e in errors.items():
        print(f"relative error {name:28s} {e:.4f}")
    for name, ms in steps.items():
        print(f"{name:32s} {ms:.2f} ms a step")


if __name__ == "__main__":
    main()
