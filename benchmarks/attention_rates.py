"""DiT-XL/2's attention (32 rows of 256 tokens, 16 heads of 72; issue 17: 1.2 ms of the FP8 step, 28 calls by
cuDNN's kernel) by each of PyTorch's fused SDPA backends — cuDNN, FlashAttention-2, memory-efficient — on q, k, v
viewed out of the qkv projection's output as the model takes them, and with the heads zero-padded to 80 (a multiple
of 16; the softmax scale kept at 1/sqrt(72), so the result is the same), to tell whether the engines should pick
another backend or pad. Median of `triton.testing.do_bench`, TFLOP/s of 4 B H T² D (D = 72), the largest
difference to cuDNN's unpadded result. A backend that refuses the inputs is recorded with its error. GPU only.
(`attention-h200.json`'s `fp8_out` rows, session 28, timed a Triton kernel of the attention with its output
quantized to e4m3 against cuDNN + Inductor's quantize, as this script then did: in the step it was slower, and it went
-- see the README's FP8 step.)

    python benchmarks/attention_rates.py --out benchmarks/results/attention-h200.json
"""

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from qandc.artifacts import write_json
from qandc.errors import error_summary
from qandc.model.dit import split_heads

BATCH, TOKENS, HEADS, HEAD_DIM, BLOCKS = 32, 256, 16, 72, 28
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def heads(qkv: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, T, D + pad] as the model views them out of qkv [B, T, 3 H D] (zero-padded when `pad`)."""
    q, k, v = split_heads(qkv, HEADS)
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
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "shape_bhtd": [BATCH, HEADS, TOKENS, HEAD_DIM], "kernels": results})
    for row, r in results.items():
        print(f"{row:16s} " + (f"{r['us']:7.1f} us {r['tflops']:6.0f} TF  {r['ms_per_step']:5.2f} ms a step  "
                                f"max diff {r['max_abs_diff']:.2e}" if "us" in r else r["error"]))


if __name__ == "__main__":
    main()
