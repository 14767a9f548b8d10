"""FP8 GEMM for Hopper in Triton with the MLP's middle fused into its epilogue: e4m3 A [M, K] (row-major) x e4m3
B = weight [N, K] (K-major), float32 accumulation, then per output channel scale (both operands' scales) and bias,
GELU (tanh) and the next layer's static activation quantize, written as e4m3. cuBLASLt's `_scaled_mm` has no GELU
epilogue: fc1 there writes bf16 [M, 4 · hidden] and a separate kernel reads it back for GELU + quantize (1.75 of the
13.2 ms of DiT-XL/2's FP8 step on the H200, `benchmarks/results/profile-step-h200.md`); here fc1 writes 1 byte an
element and nothing reads it twice. CUDA only (imported on first use); the CPU computes the same in PyTorch
(`quantized.fp8_linear_gelu_quant`). `tests/test_triton_kernels.py` checks it against that computation under
Triton's interpreter and on a GPU; whether it beats cuBLASLt + the separate kernel is for the GPU profile
(`benchmarks/profile_step.py --fused-fp8-mlp`). A second variant (`tma=True`) is persistent (one program an SM, each
looping over output tiles in the same grouped order) and reads its operands and writes its output through TMA tensor
descriptors, as Triton's persistent-matmul tutorial does; same epilogue and promotion. It ran fc1 of DiT-XL/2 7%
faster on an H200 (`benchmarks/results/gemm-h200.json`), so the op takes it on Hopper. Its autotuning also tries
the wide tiles with the epilogue in two halves (`EPILOGUE_SUBTILE`; session 13, not yet timed on a GPU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_tiles import even_k, tile_product

# e4m3's largest finite value (quantized.FP8_MAX); a jit function reads globals only as constexpr
FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 128, 4, 4),
        # the fastest at DiT-XL/2's fc1 on an H200 (136 µs; 128 x 256 x 64, 128 x 64 x 128 with 5 stages and 64 x
        # 256 x 128 tried there too: 170-334 µs, benchmarks/results/gpu-logs/gemm-h200-session8.log)
        (128, 128, 128, 3, 4),
    ]
]


def _tma_blocks(nargs: dict) -> None:
    # the descriptors' block shapes are the config's tiles (a pre_hook: the autotuner calls it before each launch);
    # the output's is half a tile wide when the epilogue stores it in two halves
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["c_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"] // (2 if nargs["EPILOGUE_SUBTILE"] else 1)]


# Hopper FP8 tiles for the TMA kernel; 128 x 256 only with 8 warps (its float32 accumulator, twice that promoting).
# The wide tiles also with their epilogue in two halves (less shared memory staging the output, as Triton's
# persistent-matmul tutorial does)
_TMA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE_SUBTILE": sub},
                  num_stages=s, num_warps=w, pre_hook=_tma_blocks)
    for bm, bn, bk, s, w, sub in [
        (128, 128, 128, 3, 4, False), (128, 128, 128, 4, 4, False), (128, 128, 128, 4, 8, False),
        (128, 256, 128, 3, 8, False), (128, 256, 64, 4, 8, False), (256, 128, 128, 3, 8, False),
        (128, 256, 128, 3, 8, True), (128, 256, 64, 4, 8, True), (128, 128, 128, 4, 8, True),
    ]
]


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def _gelu_quant(acc, rn, N, scale_ptr, bias_ptr, out_scale_ptr):
    """The epilogue of output columns `rn`: per channel scale and bias, GELU (tanh), the static quantize's clamp
    (float32; the caller converts to e4m3)."""
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    hidden = _gelu_tanh(acc * scale[None, :] + bias[None, :]) / tl.load(out_scale_ptr)
    return tl.minimum(tl.maximum(hidden, -FP8_MAX), FP8_MAX)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "PROMOTE"], cache_results=True)  # as triton_int8's
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _fp8_gemm_gelu_quant_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, out_scale_ptr, c_ptr, M, N, K,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PROMOTE: tl.constexpr = True):
    acc, rm, rn = tile_product(a_ptr, b_ptr, M, N, K, tl.float32, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                              EVEN_K, PROMOTE)

    hidden = _gelu_quant(acc, rn, N, scale_ptr, bias_ptr, out_scale_ptr)
    c = c_ptr + rm[:, None] * N + rn[None, :]
    tl.store(c, hidden.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (first row, first column) of output tile `tile`, in `tile_product`'s grouped order
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = tile // width * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    return (first_m + (tile % width) % group_m) * BLOCK_M, (tile % width) // group_m * BLOCK_N


@triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K", "PROMOTE"])  # no disk cache: Triton keeps no choice
# among configs of a pre_hook
@triton.jit
def _fp8_gemm_gelu_quant_tma_kernel(a_desc, b_desc, c_desc, scale_ptr, bias_ptr, out_scale_ptr, M, N, K,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
                                    PROMOTE: tl.constexpr = True):
    """`_fp8_gemm_gelu_quant_kernel` persistent and TMA-fed: NUM_SMS programs, each taking every NUM_SMS-th tile.
    The descriptors zero-fill rows (and K) past the tensor's end on loads and drop them on the store, so no masks.
    EPILOGUE_SUBTILE: the epilogue computes and stores the tile in two halves of BLOCK_N / 2 columns."""
    start = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    # the epilogue's own tile counter, as in the tutorial (a workaround for Blackwell's pipelining)
    tile_c = start - NUM_SMS
    for tile in tl.range(start, tiles, NUM_SMS, flatten=True):
        off_m, off_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_blocks):
            a_tile = a_desc.load([off_m, k * BLOCK_K])
            b_tile = b_desc.load([off_n, k * BLOCK_K]).T
            if PROMOTE:  # as `tile_product`: the running sum promoted to float32 every K block
                acc = tl.dot(a_tile, b_tile, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=tl.float32)
            else:
                acc = tl.dot(a_tile, b_tile, acc, out_dtype=tl.float32)

        tile_c += NUM_SMS
        off_m, off_n = _tile(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            rn = off_n + tl.arange(0, BLOCK_N // 2)
            c_desc.store([off_m, off_n], _gelu_quant(left, rn, N, scale_ptr, bias_ptr, out_scale_ptr)
                         .to(c_desc.dtype))
            c_desc.store([off_m, off_n + BLOCK_N // 2],
                         _gelu_quant(right, rn + BLOCK_N // 2, N, scale_ptr, bias_ptr, out_scale_ptr).to(c_desc.dtype))
        else:
            rn = off_n + tl.arange(0, BLOCK_N)
            c_desc.store([off_m, off_n], _gelu_quant(acc, rn, N, scale_ptr, bias_ptr, out_scale_ptr).to(c_desc.dtype))


def fp8_gemm_gelu_quant(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        out_scale: torch.Tensor, fast_accum: bool = False, tma: bool = False) -> torch.Tensor:
    """e4m3 clamp(gelu_tanh((x @ weight.T) * scale + bias) / out_scale) for e4m3 x [M, K], e4m3 weight [N, K],
    float32 scale [N], bias [N], out_scale a float32 scalar tensor. `fast_accum`: no float32 promotion of the
    running sum (`_scaled_mm`'s `use_fast_accum`; faster, less exact: `benchmarks/gemm_rates.py` measures both).
    `tma`: the persistent TMA kernel; its descriptors want K and N multiples of 16 (rows 16-byte aligned)."""
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale, bias, out_scale = scale.float().contiguous(), bias.contiguous(), out_scale.float().reshape(1)
    if tma:
        assert k % 16 == 0 and n % 16 == 0, f"the TMA kernel needs K and N multiples of 16, not {k} and {n}"
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        # block shapes set per config by `_tma_blocks`
        a, b, c = (TensorDescriptor.from_tensor(t, [1, 1]) for t in (x, weight, out))
        grid = lambda meta: (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
        _fp8_gemm_gelu_quant_tma_kernel[grid](a, b, c, scale, bias, out_scale, m, n, k, NUM_SMS=sms,
                                              PROMOTE=not fast_accum)
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _fp8_gemm_gelu_quant_kernel[grid](x, weight, scale, bias, out_scale, out, m, n, k, PROMOTE=not fast_accum)
    return out
