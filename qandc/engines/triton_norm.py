"""A DiT block's residual add, LayerNorm, adaLN modulation and FP8 activation quantize as one Triton kernel, several
rows a program: x' = x + gate · delta (bf16, written back), q = e4m3(clamp((LN(x') (1 + scale) + shift) / s)).
Inductor compiles the same computation into one reduction a row, at about half the memory's rate on the H200 (33-36
µs in the engines for DiT-XL/2's ~66 MB at 32 rows, `benchmarks/results/profile-step-h200.md`); this kernel takes 26
µs there (28.5 alone against Inductor's 51 and a copy's 21: `benchmarks/norm_rates.py`, `norm-h200.json`). CUDA
only (imported on first use); the CPU computes the same in PyTorch (`quantized.add_norm_modulate_fp8`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)


@triton.autotune(configs=[triton.Config({"ROWS": rows}, num_warps=warps) for rows in (1, 2, 4, 8)
                          for warps in (4, 8, 16)], key=["C"])
@triton.jit
def _add_norm_modulate_fp8_kernel(x_ptr, delta_ptr, gate_ptr, shift_ptr, scale_ptr, q_scale_ptr, x_out_ptr, q_ptr,
                                  M, C, TOKENS, MOD_STRIDE, eps, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None] * C + cols[None, :]
    modulation = (rows // TOKENS)[:, None] * MOD_STRIDE + cols[None, :]  # the row's image's adaLN row
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    x = (x + gate * delta).to(x_out_ptr.dtype.element_ty)  # the residual stream stays bf16
    tl.store(x_out_ptr + offsets, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)[:, None]
    shift = tl.load(shift_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    q = (normed * (1.0 + scale) + shift) / tl.load(q_scale_ptr)
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=mask)


def add_norm_modulate_fp8(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                          scale: torch.Tensor, q_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate · delta, its LayerNorm (eps) modulated and quantized to e4m3 with the static scale q_scale) for x,
    delta [B, T, C] bf16 and gate, shift, scale [B, C] (chunks of the adaLN output: rows of one stride)."""
    b, t, c = x.shape
    x, delta = x.contiguous(), delta.contiguous()
    if not (gate.stride() == shift.stride() == scale.stride() and shift.stride(1) == 1):
        gate, shift, scale = gate.contiguous(), shift.contiguous(), scale.contiguous()
    x_out = torch.empty_like(x)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    grid = lambda meta: (triton.cdiv(b * t, meta["ROWS"]),)  # noqa: E731
    _add_norm_modulate_fp8_kernel[grid](x, delta, gate, shift, scale, q_scale.float().reshape(1), x_out, q, b * t, c,
                                        t, shift.stride(0), eps, BLOCK_C=triton.next_power_of_2(c))
    return x_out, q
