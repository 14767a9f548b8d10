"""INT8 GEMM for Hopper in Triton: int8 A [M, K] (row-major) x int8 B = weight [N, K] (so B is K-major, as the
tensor cores want it), int32 accumulation, and the dequantize fused into the epilogue — per-output-channel scale
(activation scale folded in) and bias, written as bf16. `torch._int_mm` writes int32 (4 bytes an element) and
leaves the dequantize to another kernel; this writes 2 bytes and needs none. CUDA only (imported on first use)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tiles import even_k, tile_product

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 3, 4),
        (16, 32, 256, 4, 2), (32, 32, 256, 4, 4), (16, 64, 128, 5, 4),  # few rows (adaLN): many programs over N
    ]
]


# cache_results: autotuning's choice for a shape kept in Triton's cache on disk, so that a later process of this
# machine (a server's warm-up, the offline run, a rank) takes it instead of timing every config again, and picks the
# same one (`tests/test_triton_kernels.py`)
@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"], cache_results=True)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, c_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      EVEN_K: tl.constexpr):
    acc, rm, rn = tile_product(a_ptr, b_ptr, M, N, K, tl.int32, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                              EVEN_K, False)

    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * scale[None, :] + bias[None, :]
    c = c_ptr + rm[:, None] * N + rn[None, :]
    tl.store(c, out.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bf16 (x @ weight.T) * scale + bias for int8 x [M, K], int8 weight [N, K], float32 scale [N], bias [N]."""
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_gemm_kernel[grid](x, weight, scale.contiguous(), bias.contiguous(), out, m, n, k)
    return out
