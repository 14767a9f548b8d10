"""The tiling both Triton GEMMs share (`triton_int8.py`, `triton_fp8.py`): A [M, K] row-major times B given as
[N, K] (K-major, as the tensor cores want it), one [BLOCK_M, BLOCK_N] output tile a program, programs in grouped
order so that neighbours share B tiles in L2. CUDA only (imported on first use)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_product(a_ptr, b_ptr, M, N, K, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PROMOTE: tl.constexpr):
    """(this program's A @ B^T tile accumulated in ACC, its output rows, its output columns). EVEN_K: K is a
    multiple of BLOCK_K (`even_k`), so the K loads need no mask (DiT's K: 1152, 4608). PROMOTE (FP8): Hopper's
    tensor cores keep ~14 bits of a running sum; a partial accumulator promoted to float32 every K block keeps it
    exact, as cuBLASLt's `_scaled_mm` does unless `use_fast_accum` (Triton's default on sm_90 never promotes)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    b_cols = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a = a_ptr + a_rows[:, None] * K + rk[None, :]
    b = b_ptr + b_cols[None, :] * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a_tile, b_tile = tl.load(a), tl.load(b)
        else:
            left = K - k * BLOCK_K
            a_tile = tl.load(a, mask=rk[None, :] < left, other=0.0)
            b_tile = tl.load(b, mask=rk[:, None] < left, other=0.0)
        if PROMOTE:
            acc = tl.dot(a_tile, b_tile, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=ACC)
        else:
            acc = tl.dot(a_tile, b_tile, acc, out_dtype=ACC)
        a += BLOCK_K
        b += BLOCK_K
    return acc, rm, rn


def even_k(args: dict) -> bool:
    """The EVEN_K heuristic of a kernel built on `tile_product` (`triton.heuristics`)."""
    return args["K"] % args["BLOCK_K"] == 0
