"""A DiT block's attention with its output quantized for the FP8 projection after it, as one Triton kernel:
e4m3(clamp(softmax(q kᵀ / √d) v / s)) written as [B, T, C] (heads side by side, the projection's input), read
straight from the qkv projection's output [B, T, 3C] (q, k, v, each heads side by side: `Attention.attend`'s layout).
In the engines cuDNN's attention (43 µs at DiT-XL/2's 32 × 16 heads × 256 tokens × 72, 211 TFLOP/s) writes bf16 that
a second kernel reads back to quantize (8.5 µs): 1.45 ms of an H200's 9.7 ms FP8 step (session 25's profile). Here the
attention's float32 result is quantized where it is computed and only e4m3 is written. A head dim that is not a power
of two runs as two blocks (72 as 64 + 16, the second masked past 8), so the tensor cores compute 80 wide, not 128.
Online softmax over key blocks (FlashAttention's), exp2 with the log2(e) folded into the scale, the probabilities
rounded to bf16 for the second product as FlashAttention and cuDNN do. Not yet timed on a GPU. CUDA only (imported
on first use); the CPU computes the same in PyTorch (`quantized.attention_fp8`)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)


@triton.jit
def _head_block(ptr, rows, cols, T, ROW_STRIDE, D):
    """The [rows, cols] block of one head's q, k or v (`ptr` at its first element), zero past T and D."""
    return tl.load(ptr + rows[:, None] * ROW_STRIDE + cols[None, :],
                   mask=(rows[:, None] < T) & (cols[None, :] < D), other=0.0)


# key blocks of 64 and 128 (FlashAttention's), and of 256: DiT-XL/2's 256 tokens in one, no softmax rescaling
@triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                          for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
                 + [triton.Config({"BLOCK_M": m, "BLOCK_N": 256}, num_warps=w, num_stages=2)
                    for m, w in ((64, 4), (64, 8), (128, 8))],
                 key=["T", "D"], cache_results=True)
@triton.jit
def _attention_fp8_kernel(qkv_ptr, q_scale_ptr, out_ptr, T, H, C, D: tl.constexpr, qk_scale, BLOCK_A: tl.constexpr,
                          BLOCK_B: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (image, head). BLOCK_A: D's largest power of two (D itself rounded up
    where not SPLIT); SPLIT: the head's columns past BLOCK_A as a second block of BLOCK_B (≥ 16, the tensor cores'
    least K). D a constant, so that the compiler knows a head's offset 16-byte aligned (72 is no multiple of 16, the
    runtime integers it assumes aligned) and the column masks constant over the loads' vectors. qk_scale: 1/√D ·
    log2(e)."""
    per_head = tl.cdiv(T, BLOCK_M)  # a head's programs side by side (they read the same keys and values)
    image_head, block = tl.program_id(0) // per_head, tl.program_id(0) % per_head
    image, head = (image_head // H).to(tl.int64), image_head % H  # offsets past 2^31 elements at large batches
    base = qkv_ptr + image * T * 3 * C + head * D
    queries = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    q_a = _head_block(base, queries, cols_a, T, 3 * C, D)
    acc_a = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
    if SPLIT:
        q_b = _head_block(base, queries, cols_b, T, 3 * C, D)
        acc_b = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        scores = tl.dot(q_a, tl.trans(_head_block(base + C, keys, cols_a, T, 3 * C, D)))
        if SPLIT:
            scores = tl.dot(q_b, tl.trans(_head_block(base + C, keys, cols_b, T, 3 * C, D)), scores)
        scores = tl.where(keys[None, :] < T, scores * qk_scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_max[:, None])
        kept = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * kept + tl.sum(p, 1)
        p = p.to(qkv_ptr.dtype.element_ty)
        acc_a = tl.dot(p, _head_block(base + 2 * C, keys, cols_a, T, 3 * C, D), acc_a * kept[:, None])
        if SPLIT:
            acc_b = tl.dot(p, _head_block(base + 2 * C, keys, cols_b, T, 3 * C, D), acc_b * kept[:, None])
        running_max = new_max
    inverse = 1.0 / (running_sum * tl.load(q_scale_ptr))
    out = out_ptr + image * T * C + head * D + queries[:, None] * C
    _store_fp8(out, acc_a * inverse[:, None], queries, cols_a, T, D)
    if SPLIT:
        _store_fp8(out, acc_b * inverse[:, None], queries, cols_b, T, D)


@triton.jit
def _store_fp8(out, values, rows, cols, T, D):
    """`values` (already divided by the scale) clamped to e4m3's range and stored at `out`'s [rows, cols] as e4m3,
    but past T and D."""
    values = tl.minimum(tl.maximum(values, -FP8_MAX), FP8_MAX)
    tl.store(out + cols[None, :], values.to(out.dtype.element_ty), mask=(rows[:, None] < T) & (cols[None, :] < D))


def head_blocks(d: int) -> dict:
    """The kernel's column blocks for head dim `d`: one block where `d` is a power of two (at least 16), else its
    largest power of two and the rest rounded up to a power of two of at least 16."""
    whole = max(16, triton.next_power_of_2(d))
    if whole == d or d < 16:
        return {"BLOCK_A": whole, "BLOCK_B": 16, "SPLIT": False}
    first = 1 << (d.bit_length() - 1)
    return {"BLOCK_A": first, "BLOCK_B": max(16, triton.next_power_of_2(d - first)), "SPLIT": True}


def grid(image_heads: int, tokens: int):
    """The kernel's launch grid for `image_heads` (images × heads) of `tokens` tokens, given its blocks: one
    dimension, so that no batch meets the 65535 programs of a second one."""
    return lambda blocks: (image_heads * triton.cdiv(tokens, blocks["BLOCK_M"]),)


def arguments(qkv: torch.Tensor, heads: int, q_scale: torch.Tensor, out: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's arguments for contiguous `qkv` [B, T, 3C] into `out` [B, T, C], but its tiles (BLOCK_M,
    BLOCK_N, warps, stages): the positional ones, and the head's column blocks."""
    t, c = qkv.shape[1], qkv.shape[2] // 3
    d = c // heads
    return (qkv, q_scale.float().reshape(1), out, t, heads, c, d, math.log2(math.e) / math.sqrt(d)), head_blocks(d)


def attention_fp8(qkv: torch.Tensor, heads: int, q_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [B, T, C] of the attention over the bf16 qkv projection's output [B, T, 3C] (`heads` heads of C /
    heads), quantized with the static scale `q_scale` (the output projection's input scale)."""
    b, t, c3 = qkv.shape
    out = torch.empty((b, t, c3 // 3), dtype=torch.float8_e4m3fn, device=qkv.device)
    positional, columns = arguments(qkv.contiguous(), heads, q_scale, out)
    _attention_fp8_kernel[grid(b * heads, t)](*positional, **columns)
    return out
