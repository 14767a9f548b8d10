"""Real-quant modules for the Inductor engines: a quant recipe's static scales turned into FP8 and INT8 kernels.

- W8A8-FP8: the weight stored as float8 e4m3 [N, K]; the activation quantized with the recipe's static scale
  (`x / s` -> clamp -> e4m3, a pointwise op that Inductor fuses into the op producing x) and multiplied through
  `torch._scaled_mm` (cuBLASLt FP8 on Hopper), bias and both scales applied in its epilogue, bf16 out.
- W8A8-INT8: the weight stored as int8 [N, K] (column-major B for the GEMM); the activation rounded and clamped to
  int8 with its static scale (fused the same way); `qandc::int8_linear` multiplies them — on CUDA a Triton GEMM
  (`triton_int8.py`) that accumulates in int32 and applies the per-channel dequantize scale and the bias in its
  epilogue, writing bf16; on the CPU the same integer arithmetic in PyTorch (for tests and portability).
- `fuse_fp8_mlps` (`quantize_for_inference(..., fused_fp8_mlp=True)`): an MLP whose fc1 and fc2 are both FP8 runs
  fc1, its GELU and fc2's activation quantize as one op, `qandc::fp8_linear_gelu_quant` (on CUDA a Triton GEMM with
  that epilogue, `triton_fp8.py`), so the hidden activation is written once, as e4m3; the GELU then sees fc1's
  float32 epilogue instead of its bf16 output. With a tensor-wide weight scale the op is
  `qandc::fp8_linear_gelu_quant_tensorwise`: one cuBLASLt call with its GELU epilogue where nvmath-python is
  installed (`cublaslt_fp8.py`), else the same Triton GEMM.
Rounding follows ModelOpt's fake quant (INT8: round-half-even, clamp to [-128, 127], scale amax/127; FP8: scale
amax/448), so the engines compute what the fake-quant model computes, up to bf16 and accumulation order.
Everything not quantized runs in bf16.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import QandcError
from ..model.dit import DiTBlock, Mlp, modulate

INT8_MAX, FP8_MAX = 127.0, 448.0


@torch.library.custom_op("qandc::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """int8 x [M, K] times int8 weight [N, K]^T, times scale [N] (float32), plus bias [N]; bf16 [M, N]."""
    if x.is_cuda:
        from .triton_int8 import int8_gemm

        return int8_gemm(x, weight, scale, bias)
    acc = torch._int_mm(x, weight.t()) if x.shape[0] > 16 else x.int() @ weight.int().t()
    return (acc.float() * scale + bias.float()).to(torch.bfloat16)


@int8_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("qandc::fp8_linear_gelu_quant", mutates_args=())
def fp8_linear_gelu_quant(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          out_scale: torch.Tensor, fast_accum: bool = False) -> torch.Tensor:
    """e4m3 x [M, K] times e4m3 weight [N, K]^T, times scale [N] (float32), plus bias [N], through GELU (tanh),
    quantized to e4m3 with the static scale `out_scale` (the next layer's activation scale); e4m3 [M, N].
    `fast_accum`: the GPU kernel's running sum without float32 promotion (the CPU sums in float32 either way).
    On Hopper and later, with K and N multiples of 16, the persistent TMA kernel runs (fc1 of DiT-XL/2 on an H200:
    106 us against the pointer kernel's 114 without promotion, 126 against 136 with it; `gemm-h200.json`)."""
    if x.is_cuda:
        from .triton_fp8 import fp8_gemm_gelu_quant

        tma = torch.cuda.get_device_capability(x.device) >= (9, 0) and x.shape[1] % 16 == 0 == weight.shape[0] % 16
        return fp8_gemm_gelu_quant(x, weight, scale, bias, out_scale, fast_accum, tma)
    hidden = torch.nn.functional.gelu((x.float() @ weight.float().t()) * scale + bias.float(), approximate="tanh")
    return to_fp8(hidden, out_scale)


@fp8_linear_gelu_quant.register_fake
def _(x, weight, scale, bias, out_scale, fast_accum=False):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float8_e4m3fn)


@torch.library.custom_op("qandc::fp8_linear_gelu_quant_tensorwise", mutates_args=())
def fp8_linear_gelu_quant_tensorwise(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                     out_scale: torch.Tensor, inverse_out_scale: torch.Tensor,
                                     fast_accum: bool = False) -> torch.Tensor:
    """`fp8_linear_gelu_quant` for a tensor-wide weight scale (`scale` [N] then holds one value, the product of both
    operands' scales), with the inverse of `out_scale` too: on CUDA one cuBLASLt call with the GELU + bias epilogue
    where `cublaslt_fp8.usable` (nvmath-python installed, compute capability 8.9 or later, and cuBLASLt can plan
    it), else the Triton kernel."""
    if x.is_cuda:
        from . import cublaslt_fp8

        if cublaslt_fp8.usable(x, weight):
            try:
                return cublaslt_fp8.fp8_gemm_gelu_quant(x, weight, scale[:1], bias, inverse_out_scale, fast_accum)
            except cublaslt_fp8.Unsupported:
                pass  # warned once; the Triton kernel from now on
    return fp8_linear_gelu_quant(x, weight, scale, bias, out_scale, fast_accum)


@fp8_linear_gelu_quant_tensorwise.register_fake
def _(x, weight, scale, bias, out_scale, inverse_out_scale, fast_accum=False):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float8_e4m3fn)


@torch.library.custom_op("qandc::add_norm_modulate_fp8", mutates_args=())
def add_norm_modulate_fp8(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                          scale: torch.Tensor, q_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the next branch's input in one pass: x' = x + gate · delta (bf16 [B, T, C]; gate, shift,
    scale [B, C]) and e4m3 (LayerNorm(x', eps) · (1 + scale) + shift) / q_scale; (x', the e4m3 [B, T, C])."""
    if x.is_cuda:
        from .triton_norm import add_norm_modulate_fp8 as kernel

        return kernel(x, delta, gate, shift, scale, q_scale, eps)
    return add_norm_modulate_float32(x, delta, gate, shift, scale, q_scale, eps)


def add_norm_modulate_float32(x, delta, gate, shift, scale, q_scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm_modulate_fp8`'s arithmetic in PyTorch on any device: float32 throughout, the residual stream
    rounded once to x's dtype (the op's CPU path, and what the GPU kernel is checked against)."""
    added = (x.float() + gate.float().unsqueeze(1) * delta.float()).to(x.dtype).contiguous()
    normed = torch.nn.functional.layer_norm(added.float(), added.shape[-1:], eps=eps)
    return added, to_fp8(normed * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1), q_scale)


@add_norm_modulate_fp8.register_fake
def _(x, delta, gate, shift, scale, q_scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.float8_e4m3fn)  # contiguous, as the kernel's


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to e4m3 with a static scale (ModelOpt's FP8 fake quant: x / s, clamped to ±448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _scales(amax: torch.Tensor, maximum: float, what: str) -> torch.Tensor:
    amax = amax.detach().float().reshape(-1)
    if not torch.isfinite(amax).all() or (amax <= 0).any():
        raise QandcError(f"{what}: amax {amax.min().item():g} is zero or not finite (a zero-initialised layer, or "
                         "calibration data that never reached it); no static scale can be made")
    return amax / maximum


class QuantLinear(nn.Module):
    """A Linear computed by a real FP8 or INT8 kernel with static per-tensor activation and per-tensor or
    per-channel weight scales. `fast_accum` (FP8): `_scaled_mm`'s running sum without float32 promotion."""

    def __init__(self, linear: nn.Linear, weight_amax: torch.Tensor, input_amax: torch.Tensor, fmt: str, name="",
                 fast_accum: bool = False):
        super().__init__()
        self.fmt, self.fast_accum = fmt, fast_accum
        maximum = FP8_MAX if fmt == "fp8" else INT8_MAX
        w_scale = _scales(weight_amax, maximum, f"{name}.weight_quantizer")
        a_scale = _scales(input_amax, maximum, f"{name}.input_quantizer")
        if a_scale.numel() != 1:
            raise QandcError(f"{name}.input_quantizer: per-tensor activation scales only, got {a_scale.numel()}")
        weight = linear.weight.detach().float().cpu()  # scales are on the CPU; the caller moves the module
        scaled = weight / w_scale[:, None] if w_scale.numel() > 1 else weight / w_scale
        if fmt == "fp8":
            q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            q = torch.round(scaled).clamp(-128, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("input_scale", a_scale.reshape(()))
        self.register_buffer("weight_scale", w_scale.reshape(()) if w_scale.numel() == 1 else w_scale)
        # INT8 epilogue scale: per output channel, activation scale folded in
        self.register_buffer("out_scale", (w_scale * a_scale).expand(weight.shape[0]).contiguous())
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias.to(torch.bfloat16))

    @classmethod
    def stacked(cls, layers: list["QuantLinear"]) -> "QuantLinear":
        """One QuantLinear computing `layers` (one format, one input scale) side by side: their quantized weights
        stacked along N with per-channel weight scales, so that one GEMM gives their outputs concatenated, each as
        its layer gives it up to the order in which the epilogue applies the two scales."""
        first = layers[0]
        if any(layer.fmt != first.fmt or not torch.equal(layer.input_scale, first.input_scale) for layer in layers):
            raise QandcError("only layers of one format and one input scale can be stacked")
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        stacked.fmt, stacked.fast_accum = first.fmt, first.fast_accum
        stacked.register_buffer("weight", torch.cat([layer.weight for layer in layers]))
        stacked.register_buffer("input_scale", first.input_scale.clone())
        stacked.register_buffer("weight_scale", torch.cat([layer.weight_scale.expand(layer.weight.shape[0])
                                                           for layer in layers]))
        for name in ("out_scale", "bias"):
            stacked.register_buffer(name, torch.cat([getattr(layer, name) for layer in layers]))
        return stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.fmt == "int8":
            q = torch.round(x.float() / self.input_scale).clamp(-128, 127).to(torch.int8)
            out = int8_linear(q, self.weight, self.out_scale, self.bias)
        else:
            out = self._fp8(x)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _fp8(self, x):
        return self.fp8_matmul(to_fp8(x, self.input_scale))

    def fp8_matmul(self, q: torch.Tensor) -> torch.Tensor:
        """bf16 output of the e4m3 activation `q` (quantized with this layer's input scale) [M, K]."""
        if self.weight_scale.dim() == 0:
            scale_a, scale_b = self.input_scale, self.weight_scale
        elif not q.is_cuda:  # row-wise scales: torch 2.11's CPU _scaled_mm takes tensor-wide ones only
            product = q.float() @ self.weight.float().t()  # e4m3 products are exact in float32
            return (product * self.out_scale + self.bias.float()).to(torch.bfloat16)
        else:  # row-wise scales: both operands per row
            scale_a = self.input_scale.expand(q.shape[0], 1).contiguous()
            scale_b = self.weight_scale.reshape(1, -1)
        return torch._scaled_mm(q, self.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=self.bias,
                                out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)

    def from_fp8(self, q: torch.Tensor) -> torch.Tensor:
        """`fp8_matmul` of an e4m3 activation of any leading shape [..., K]; bf16 [..., N]."""
        out = self.fp8_matmul(q.reshape(-1, q.shape[-1]))
        return out.reshape(*q.shape[:-1], out.shape[-1])


class FusedFp8Mlp(nn.Module):
    """An MLP (fc1 → GELU tanh → fc2) whose two Linears are FP8 QuantLinears: fc1, the GELU and fc2's activation
    quantize as one op, then fc2's `_scaled_mm` on the e4m3 hidden activation. With fc1's weight scale tensor-wide,
    the op is `fp8_linear_gelu_quant_tensorwise` (cuBLASLt's GELU epilogue where usable)."""

    def __init__(self, fc1: QuantLinear, fc2: QuantLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.tensorwise = fc1.weight_scale.dim() == 0
        if self.tensorwise:
            self.register_buffer("inverse_hidden_scale", 1 / fc2.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_fp8(to_fp8(x, self.fc1.input_scale))

    def from_fp8(self, q: torch.Tensor) -> torch.Tensor:
        """The MLP of an input already quantized with fc1's input scale (e4m3 [..., C]); bf16 out."""
        shape = q.shape
        q = q.reshape(-1, shape[-1])
        if self.tensorwise:
            hidden = fp8_linear_gelu_quant_tensorwise(q, self.fc1.weight, self.fc1.out_scale, self.fc1.bias,
                                                      self.fc2.input_scale, self.inverse_hidden_scale,
                                                      self.fc1.fast_accum)
        else:
            hidden = fp8_linear_gelu_quant(q, self.fc1.weight, self.fc1.out_scale, self.fc1.bias,
                                           self.fc2.input_scale, self.fc1.fast_accum)
        out = self.fc2.fp8_matmul(hidden)
        return out.reshape(*shape[:-1], out.shape[-1])


def _is_fp8(layer) -> bool:
    """Whether `layer` is an FP8 QuantLinear."""
    return isinstance(layer, QuantLinear) and layer.fmt == "fp8"


def fuse_fp8_mlps(model: nn.Module) -> None:
    """Replace, in place, every MLP of `model` whose fc1 and fc2 are FP8 QuantLinears by a FusedFp8Mlp."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Mlp) and _is_fp8(module.fc1) and _is_fp8(module.fc2):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedFp8Mlp(module.fc1, module.fc2))


class FusedFp8Block(DiTBlock):
    """A DiT block whose FP8 qkv and fc1 take their e4m3 inputs from `qandc::add_norm_modulate_fp8`: the residual
    add of the branch before and the next branch's LayerNorm, modulation and quantize in one pass. The MLP branch's
    residual add is handed to the next block, as (x, branch output, gate, modulations), unless the block is `last`
    of a run of fused blocks; the cache's reads and writes are the DiTBlock's (`DiTBlock.branch_parts`). With
    `slot`, the block's adaLN output is that slot of its run's modulations, which the run's first block computes
    (`modulations`: one GEMM for every block of the run, whose adaLN Linears take the same input) and hands on."""

    def __init__(self, block: DiTBlock, last: bool, slot: int | None = None, modulations: nn.Module | None = None):
        nn.Module.__init__(self)
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.adaLN_modulation = block.adaLN_modulation if slot is None else None
        self.modulations, self.slot, self.last = modulations, slot, last

    def forward(self, x, c, name: str = "", io=None):
        x, delta, gate, modulations = x if isinstance(x, tuple) else (x, None, None, None)
        if self.modulations is not None:
            modulations = self.modulations(c)
        if self.slot is None:
            own = self.adaLN_modulation(c)
        else:
            width = 6 * self.norm1.normalized_shape[0]
            own = modulations[:, self.slot * width:(self.slot + 1) * width]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = own.chunk(6, dim=1)
        stream = _Residual(x, delta, gate)
        qkv = self.attn.qkv

        def attention():
            q = stream.branch_input(self.norm1, shift_msa, scale_msa, qkv.input_scale)
            return self.attn.attend(qkv.from_fp8(q))

        def mlp():
            q = stream.branch_input(self.norm2, shift_mlp, scale_mlp, self.mlp.fc1.input_scale)
            if isinstance(self.mlp, FusedFp8Mlp):
                return self.mlp.from_fp8(q)
            return self.mlp.fc2(self.mlp.act(self.mlp.fc1.from_fp8(q)))

        stream.hand(*self.branch_parts(f"{name}.attn", gate_msa, io, attention))
        stream.hand(*self.branch_parts(f"{name}.mlp", gate_mlp, io, mlp))
        return stream.added() if self.last else (stream.x, stream.delta, stream.gate, modulations)


class _Residual:
    """A residual stream with at most one branch output not yet added (gate None: gated already)."""

    def __init__(self, x, delta=None, gate=None):
        self.x, self.delta, self.gate = x, delta, gate

    def added(self) -> torch.Tensor:
        if self.delta is not None:
            self.x = self.x + (self.delta if self.gate is None else self.gate.unsqueeze(1) * self.delta)
            self.delta = self.gate = None
        return self.x

    def hand(self, delta, gate) -> None:
        """A branch's output to add: the one before it is added first unless a branch input took it in."""
        self.added()
        self.delta, self.gate = delta, gate

    def branch_input(self, norm: nn.LayerNorm, shift, scale, q_scale) -> torch.Tensor:
        """The pending branch output added and the stream's e4m3 modulated LayerNorm, in one op where one is
        pending."""
        if self.delta is None:
            return to_fp8(modulate(norm(self.x), shift, scale), q_scale)
        gate = torch.ones_like(shift) if self.gate is None else self.gate
        # the stream contiguous in the graph, where the kernel that computes it can write it so: the first block's
        # (the patch embedding's output, transposed) was copied by the op's wrapper, eagerly (63 µs a DiT-XL/2 step
        # on an H200, session 21's profile). Not the op's contiguous-strides tag: that made Inductor copy the
        # adaLN chunks too, which the kernel reads strided (4 copies a block, 0.17 ms a step)
        self.x, q = add_norm_modulate_fp8(self.x.contiguous(), self.delta, gate, shift, scale, q_scale, norm.eps)
        self.delta = self.gate = None
        return q


def fuse_fp8_norms(model: nn.Module) -> None:
    """Replace, in place, every DiT block of `model` whose qkv and fc1 are FP8 QuantLinears by a FusedFp8Block
    (the last of each run of them adds its MLP branch itself). Where every block of a run takes the model's one
    condition (no block embedders) and their adaLN Linears are FP8 of one input scale (calibrated on that same
    input), the run computes them as one stacked GEMM (`QuantLinear.stacked`): on DiT-XL/2 28 launches of a
    [32, 1152] x [1152, 6912] GEMM, 0.18 ms a step on an H200, became one of 0.07 ms (session 22's profile)."""
    blocks = model.blocks
    fusable = [_is_fp8(getattr(b.attn, "qkv", None)) and _is_fp8(b.mlp.fc1) for b in blocks]
    start = 0
    while start < len(blocks):
        end = start
        while end < len(blocks) and fusable[end]:
            end += 1
        run = range(start, end)
        linears = [blocks[i].adaLN_modulation[-1] for i in run]
        shared = len(run) > 1 and not len(getattr(model, "block_embedders", ())) and all(
            _is_fp8(m) and torch.equal(m.input_scale, linears[0].input_scale) for m in linears)
        modulations = nn.Sequential(blocks[start].adaLN_modulation[0], QuantLinear.stacked(linears)) if shared \
            else None
        for slot, i in enumerate(run):
            blocks[i] = FusedFp8Block(blocks[i], last=i + 1 == end, slot=slot if shared else None,
                                      modulations=modulations if shared and slot == 0 else None)
        start = end + 1


def quantize_for_inference(model: nn.Module, recipe_dir: str | Path | None, dtype=torch.bfloat16,
                           fused_fp8_mlp: bool = False, fp8_fast_accum: bool = False,
                           fused_fp8_norm: bool = False) -> nn.Module:
    """A copy of `model` in `dtype` with every Linear the recipe quantizes replaced by a QuantLinear carrying the
    recipe's static scales (read from its amax file; ModelOpt is not needed), with `fused_fp8_mlp` its FP8 MLPs
    fused (`fuse_fp8_mlps`) and with `fused_fp8_norm` the residual adds and norms before FP8 qkv and fc1
    (`fuse_fp8_norms`); `fp8_fast_accum`: FP8 GEMMs without float32 promotion of the running sum. No recipe: the
    plain `dtype` model."""
    source = model
    model = copy.deepcopy(model).to(dtype).eval()
    if recipe_dir is None:
        return model
    from ..formats.recipe import EXPORTABLE, QuantRecipe, load_amax

    recipe = QuantRecipe.load(recipe_dir)
    if recipe.preset not in EXPORTABLE:
        raise QandcError(f"{recipe_dir}: {recipe.preset} is fake quant only; real kernels exist for "
                         f"{' and '.join(EXPORTABLE)}")
    amax = load_amax(recipe_dir)
    fmt = "fp8" if recipe.preset == "w8a8-fp8" else "int8"
    modules, originals = dict(model.named_modules()), dict(source.named_modules())  # weights quantized from float32
    for name in recipe.layers:
        keys = (f"{name}.weight_quantizer", f"{name}.input_quantizer")
        if name not in modules or any(k not in amax for k in keys):
            raise QandcError(f"{recipe_dir}: the recipe quantizes {name}, which this model or its amax file lacks")
        parent, _, child = name.rpartition(".")
        layer = QuantLinear(originals[name], amax[keys[0]], amax[keys[1]], fmt, name, fp8_fast_accum).to(model.device)
        setattr(modules[parent], child, layer)
    if fused_fp8_mlp:
        fuse_fp8_mlps(model)
    if fused_fp8_norm:
        fuse_fp8_norms(model)
    return model
