"""DiT-XL/2's attention (32 rows of 256 tokens, 16 heads of 72; issue 17: 1.2 ms of the FP8 step, 28 calls by
cuDNN's kernel) by each of PyTorch's fused SDPA backends — cuDNN, FlashAttention-2, memory-efficient — on q, k, v
viewed out of the qkv projection's output as the model takes them, and with the heads zero-padded to 80 (a multiple
of 16; the softmax scale kept at 1/sqrt(72), so the result is the same), to tell whether the engines should pick
another backend or pad. Median of `triton.testing.do_bench`, TFLOP/s of 4 B H T² D (D = 72), the largest
difference to cuDNN's unpadded result. A backend that refuses the inputs is recorded with its error.
`fp8_out`: what the FP8 engines run between the qkv and the output projection's GEMMs, the attention and the
projection's activation quantize -- cuDNN's attention then Inductor's quantize kernel (`cudnn_then_quantize`, as
the engines are compiled), against qandc's one Triton kernel (`triton_autotuned`, and each of its configs), each
timed by `do_bench` and replayed in a CUDA graph (`us_cuda_graph`, the engines' way), with the share of e4m3
outputs equal to the float32 attention's quantized (`exact_share`). GPU only.

    python benchmarks/attention_rates.py --out benchmarks/results/attention-h200.json
"""

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from qandc.artifacts import write_json
from qandc.engines import triton_attention
from qandc.engines.quantized import attention_float32, to_fp8
from qandc.errors import error_summary

BATCH, TOKENS, HEADS, HEAD_DIM, BLOCKS = 32, 256, 16, 72, 28
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def heads(qkv: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, T, D + pad] as the model views them out of qkv [B, T, 3 H D] (zero-padded when `pad`)."""
    q, k, v = qkv.reshape(BATCH, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    return tuple(F.pad(t, (0, pad)) for t in (q, k, v)) if pad else (q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    qkv = torch.randn(BATCH, TOKENS, 3 * HEADS * HEAD_DIM, device="cuda").bfloat16()
    flops = 4 * BATCH * HEADS * TOKENS ** 2 * HEAD_DIM
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        reference = F.scaled_dot_product_attention(*heads(qkv, 0)).float()
    results = {}
    for pad in (0, 80 - HEAD_DIM):
        q, k, v = heads(qkv, pad)
        for name, backend in BACKENDS.items():
            row = f"{name}_d{HEAD_DIM + pad}"

            def call(q=q, k=k, v=v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(HEAD_DIM))
            try:
                got = call()[..., :HEAD_DIM].float()
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            except RuntimeError as e:  # the backend refuses these inputs (head size, layout, card)
                results[row] = {"error": error_summary(e)}
                continue
            results[row] = {"us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12,
                            "ms_per_step": ms * BLOCKS, "max_abs_diff": (got - reference).abs().max().item()}
    fp8_out = attention_fp8_out(qkv, flops)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "shape_bhtd": [BATCH, HEADS, TOKENS, HEAD_DIM], "kernels": results, "fp8_out": fp8_out})
    for row, r in [*results.items(), *fp8_out.items()]:
        print(f"{row:28s} " + (f"{r['us']:7.1f} us {r['tflops']:6.0f} TF  {r['ms_per_step']:5.2f} ms a step  "
                                + (f"in a CUDA graph {r['us_cuda_graph']:7.1f} us  " if "us_cuda_graph" in r else "")
                                + (f"max diff {r['max_abs_diff']:.2e}" if "max_abs_diff" in r
                                   else f"exact {r['exact_share']:.4f}") if "us" in r else r["error"]))


def attention_fp8_out(qkv: torch.Tensor, flops: int) -> dict:
    """The attention with its output quantized to e4m3 [B, T, C], by cuDNN + Inductor's quantize and by qandc's
    kernel (autotuned, and each config): µs, TFLOP/s, ms a step, µs replayed in a CUDA graph, exact share."""
    q_scale = torch.tensor(0.004, device="cuda")
    want = attention_float32(qkv, HEADS, q_scale).float()
    quantize = torch.compile(lambda x: to_fp8(x.transpose(1, 2).reshape(BATCH, TOKENS, HEADS * HEAD_DIM), q_scale))

    def cudnn_then_quantize():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return quantize(F.scaled_dot_product_attention(*heads(qkv, 0)))

    kernel = triton_attention._attention_fp8_kernel
    calls = {"cudnn_then_quantize": cudnn_then_quantize,
             "triton_autotuned": lambda: triton_attention.attention_fp8(qkv, HEADS, q_scale)}
    out = torch.empty(BATCH, TOKENS, HEADS * HEAD_DIM, dtype=torch.float8_e4m3fn, device="cuda")
    positional, columns = triton_attention.arguments(qkv, HEADS, q_scale, out)

    def launch(blocks: dict) -> torch.Tensor:
        kernel.fn[triton_attention.grid(BATCH * HEADS, TOKENS)(blocks)](*positional, **columns, **blocks)
        return out

    for config in kernel.configs:
        blocks = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        calls["triton_" + "_".join(f"{k}{v}" for k, v in blocks.items())] = lambda blocks=blocks: launch(blocks)
    results = {}
    for name, call in calls.items():
        try:
            got = call().float()
            ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            graph_ms = triton.testing.do_bench_cudagraph(call, rep=100, return_mode="median")
        except Exception as e:  # a config this card cannot run (shared memory): recorded, not fatal
            results[name] = {"error": error_summary(e)}
            continue
        results[name] = {"us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12, "ms_per_step": ms * BLOCKS,
                         "us_cuda_graph": graph_ms * 1e3, "exact_share": (got == want).float().mean().item()}
    if "us" in results["triton_autotuned"]:
        best = kernel.best_config
        results["triton_autotuned"]["config"] = {**best.kwargs, "num_warps": best.num_warps,
                                                 "num_stages": best.num_stages}
    return results


if __name__ == "__main__":
    main()
