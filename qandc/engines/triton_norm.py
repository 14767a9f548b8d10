"""A DiT block's residual add, LayerNorm, adaLN modulation and FP8 activation quantize as one Triton kernel, several
rows a program: x' = x + gate · delta (bf16, written back), q = e4m3(clamp((LN(x') (1 + scale) + shift) / s)).
Inductor compiles the same computation into one reduction a row, at about half the memory's rate on the H200 (33-36
µs in the engines for DiT-XL/2's ~66 MB at 32 rows, `benchmarks/results/profile-step-h200.md`); this kernel takes 26
µs there (28.5 alone against Inductor's 51 and a copy's 21: `benchmarks/norm_rates.py`, `norm-h200.json`). A row
whose width is not a power of two runs as two blocks, so that 1152 columns take 1024 + 128 lanes instead of 2048: 22
µs a call in DiT-XL/2's step (`measured_config`). CUDA only (imported on first use); the CPU computes the same in
PyTorch (`quantized.add_norm_modulate_fp8`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._inductor import config as inductor_config

FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)


@triton.jit
def _residual(x_ptr, delta_ptr, gate_ptr, x_out_ptr, rows, cols, M, C, TOKENS, MOD_STRIDE):
    """x + gate · delta over `cols` of `rows`, written back as bf16; (it in float32, the mask, the offsets, the
    adaLN offsets)."""
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None] * C + cols[None, :]
    modulation = (rows // TOKENS)[:, None] * MOD_STRIDE + cols[None, :]  # the row's image's adaLN row
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    x = (x + gate * delta).to(x_out_ptr.dtype.element_ty)  # the residual stream stays bf16
    tl.store(x_out_ptr + offsets, x, mask=mask)
    return x.to(tl.float32), mask, offsets, modulation


@triton.jit
def _modulate_quantize(normed, mask, offsets, modulation, shift_ptr, scale_ptr, q_scale_ptr, q_ptr):
    shift = tl.load(shift_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + modulation, mask=mask, other=0.0).to(tl.float32)
    q = (normed * (1.0 + scale) + shift) / tl.load(q_scale_ptr)
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=mask)


def measured_config(configs: list, named_args: dict, **kwargs) -> list:
    """The one config the kernel runs at a width C: 4 rows a program, 4 warps, a row as two blocks (SPLIT) where C
    is not a power of two, as one block where it is. Measured, not autotuned: autotuning times its candidates on
    inputs flushed from L2, where the step's come partly hot, and its choice changed from machine to machine -- 2
    rows × 8 warps one-block in session 15 (the step's norms 1.60 ms against 1.27 with this config), 4 rows × 16
    warps in session 21 (1.60 ms again: 10.22 ms a step). Replayed in a CUDA graph at DiT-XL/2's shape this config
    took 23.3 µs, the fastest of 24 in session 15; of the 32 with 2 warps too (session 29), 2 rows × 2 warps took
    22.6 against its 23.4 -- 0.05 ms a step, under the step's noise between sittings: kept (`benchmarks/norm_rates.py`,
    `norm-h200.json`; H200)."""
    c = named_args["C"]
    split = c & (c - 1) != 0
    return [config for config in configs
            if config.kwargs == {"ROWS": 4, "SPLIT": split} and config.num_warps == 4]


# every config kept for norm_rates.py's sweep, one run (measured_config); cache_results as triton_int8's
@triton.autotune(configs=[triton.Config({"ROWS": rows, "SPLIT": split}, num_warps=warps) for rows in (1, 2, 4, 8)
                          for warps in (2, 4, 8, 16) for split in (False, True)], key=["C"],
                 prune_configs_by={"early_config_prune": measured_config}, cache_results=True)
@triton.jit
def _add_norm_modulate_fp8_kernel(x_ptr, delta_ptr, gate_ptr, shift_ptr, scale_ptr, q_scale_ptr, x_out_ptr, q_ptr,
                                  M, C, TOKENS, MOD_STRIDE, eps, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
                                  BLOCK_B: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                                  DEPENDENT: tl.constexpr):
    """BLOCK_C: C's next power of two. SPLIT: a row as two blocks instead, BLOCK_A (C's largest power of two) and
    BLOCK_B (the rest's next power of two; 1 and masked when C is a power of two), so that a row of 1152 takes
    1024 + 128 lanes, not 2048. DEPENDENT: launched before the previous kernel ends (programmatic dependent launch),
    so it waits for that kernel's writes before reading anything."""
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    if SPLIT:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        xa, mask_a, offsets_a, mod_a = _residual(x_ptr, delta_ptr, gate_ptr, x_out_ptr, rows, tl.arange(0, BLOCK_A),
                                                 M, C, TOKENS, MOD_STRIDE)
        xb, mask_b, offsets_b, mod_b = _residual(x_ptr, delta_ptr, gate_ptr, x_out_ptr, rows, cols_b, M, C, TOKENS,
                                                 MOD_STRIDE)
        mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / C
        centred_a = tl.where(mask_a, xa - mean[:, None], 0.0)
        centred_b = tl.where(mask_b, xb - mean[:, None], 0.0)
        rstd = tl.rsqrt((tl.sum(centred_a * centred_a, axis=1) + tl.sum(centred_b * centred_b, axis=1)) / C + eps)
        _modulate_quantize(centred_a * rstd[:, None], mask_a, offsets_a, mod_a, shift_ptr, scale_ptr, q_scale_ptr,
                           q_ptr)
        _modulate_quantize(centred_b * rstd[:, None], mask_b, offsets_b, mod_b, shift_ptr, scale_ptr, q_scale_ptr,
                           q_ptr)
    else:
        x, mask, offsets, modulation = _residual(x_ptr, delta_ptr, gate_ptr, x_out_ptr, rows, tl.arange(0, BLOCK_C),
                                                 M, C, TOKENS, MOD_STRIDE)
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
        _modulate_quantize(centred * rstd[:, None], mask, offsets, modulation, shift_ptr, scale_ptr, q_scale_ptr,
                           q_ptr)


def blocks(c: int) -> dict:
    """The kernel's block widths for rows of `c`: BLOCK_C, BLOCK_A and BLOCK_B."""
    below = 1 << (c.bit_length() - 1)
    return {"BLOCK_C": triton.next_power_of_2(c), "BLOCK_A": below,
            "BLOCK_B": triton.next_power_of_2(c - below) if c > below else 1}


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
    # launched as Inductor launches the engines' own kernels: dependent where `triton.enable_pdl` is set
    # (TORCHINDUCTOR_ENABLE_PDL=1), so that one switch makes the whole step's Triton kernels dependent launches. Off
    # by default: on the H200 the FP8 step gained nothing by it (session 25, README's bench section)
    dependent = {"launch_pdl": True} if getattr(inductor_config.triton, "enable_pdl", False) else {}
    _add_norm_modulate_fp8_kernel[grid](x, delta, gate, shift, scale, q_scale.float().reshape(1), x_out, q, b * t, c,
                                        t, shift.stride(0), eps, **blocks(c), DEPENDENT=bool(dependent), **dependent)
    return x_out, q
