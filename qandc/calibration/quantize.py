"""Quantization with NVIDIA ModelOpt, and the quant recipe every later stage reads.

Presets (written as explicit ModelOpt configs, one entry per quantized Linear, max calibration):
- w8a8-int8: weights INT8 symmetric per output channel, activations INT8 symmetric per tensor. (The paper uses
  min-max *asymmetric* activations; TensorRT's INT8 Q/DQ is symmetric, so qandc is too.)
- w8a8-fp8: weights FP8 e4m3 per tensor (per output channel with `fp8_weight_per_channel`), activations FP8 e4m3
  per tensor.
- w4a8: weights INT4 symmetric per output channel (not ModelOpt's block-wise AWQ), activations INT8 per tensor.
  Fake quant only, for the quality study: export and engines refuse it.
Default scope: every Linear inside the DiT blocks; embedders and the final layer stay in high precision; `keep`
patterns (fnmatch on module names, e.g. "blocks.0.*" or "*.adaLN_modulation.1") keep more.

A recipe directory holds recipe.json (preset, quantizer configs, selector, pool id, cache plan, sampler settings,
VC form) and amax.safetensors (one amax per enabled quantizer), plus vc.safetensors once VC is fitted. Loading it
re-creates the fake-quant model without re-calibrating and without pickles.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..artifacts import atomic_path, mistyped, read_json, read_safetensors, write_json
from ..errors import QandcError
from ..sampling import CachePlan

PRESETS = ("w8a8-int8", "w8a8-fp8", "w4a8")
EXPORTABLE = ("w8a8-int8", "w8a8-fp8")
FP8 = (4, 3)  # e4m3
RECIPE, AMAX, VC = "recipe.json", "amax.safetensors", "vc.safetensors"


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
        with warnings.catch_warnings():  # imported by quantize(); its HuggingFace-export note is noise here
            warnings.filterwarnings("ignore", "Cannot find transformers package")
            import modelopt.torch.export  # noqa: F401
    except ImportError:
        raise QandcError("quantization needs nvidia-modelopt (pip install nvidia-modelopt==0.47.0)") from None
    return mtq


def quantizer_formats(preset: str, fp8_weight_per_channel: bool = False) -> tuple[dict, dict]:
    """(weight quantizer cfg, input quantizer cfg) of a preset, as ModelOpt quantizer attributes."""
    if preset == "w8a8-int8":
        return {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}
    if preset == "w8a8-fp8":
        return {"num_bits": FP8, "axis": 0 if fp8_weight_per_channel else None}, {"num_bits": FP8, "axis": None}
    if preset == "w4a8":
        return {"num_bits": 4, "axis": 0}, {"num_bits": 8, "axis": None}
    raise QandcError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def quantized_layers(model: nn.Module, keep: list[str] = ()) -> list[str]:
    """Names of the Linear layers inside the blocks that are quantized (those not matching a `keep` pattern)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in keep)]


def modelopt_config(preset: str, layers: list[str], fp8_weight_per_channel: bool = False) -> dict:
    weight, activation = quantizer_formats(preset, fp8_weight_per_channel)
    entries = [{"quantizer_name": "*", "enable": False}]
    for name in layers:
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": dict(weight), "enable": True})
        entries.append({"quantizer_name": f"{name}.input_quantizer", "cfg": dict(activation), "enable": True})
    return {"quant_cfg": entries, "algorithm": "max"}


@dataclass
class QuantRecipe:
    """Everything that defines a quantized + cached pipeline, except the tensors (amax, VC) stored beside it."""

    preset: str
    layers: list[str]
    plan: dict
    steps: int
    sampler: str
    cfg_scale: float
    fp8_weight_per_channel: bool = False
    keep: list[str] = field(default_factory=list)
    selector: dict = field(default_factory=dict)
    pool_id: str = ""
    checkpoint_sha256: str = ""
    vc: dict | None = None   # {"form": "mse" | "nsr", "eps": ..., "samples": ...} once fitted
    format_version: int = 1

    @property
    def cache_plan(self) -> CachePlan:
        return CachePlan.from_dict(self.plan)

    def modelopt_config(self) -> dict:
        return modelopt_config(self.preset, self.layers, self.fp8_weight_per_channel)

    def save(self, folder: Path) -> None:
        write_json(folder / RECIPE, {**asdict(self), "modelopt_config": self.modelopt_config()})

    @classmethod
    def load(cls, folder: str | Path) -> "QuantRecipe":
        path = Path(folder) / RECIPE
        data = read_json(path, f"not a quant recipe folder (no {RECIPE})")
        data.pop("modelopt_config", None)
        if data.get("format_version") != 1:
            raise QandcError(f"{path}: recipe format {data.get('format_version')!r}, this qandc reads format 1")
        wrong = mistyped(cls, data)
        if wrong:
            raise QandcError(f"{path}: not a quant recipe (wrong types: {', '.join(wrong)})")
        try:
            recipe = cls(**data)
            quantizer_formats(recipe.preset)
            CachePlan.from_dict(recipe.plan)
        except (TypeError, QandcError) as e:
            raise QandcError(f"{path}: not a quant recipe ({e})") from None
        return recipe


def quantize(model: nn.Module, recipe: QuantRecipe, forward_loop) -> nn.Module:
    """Insert ModelOpt fake quantizers per the recipe and calibrate them (max) with `forward_loop(model)`."""
    mtq = _mtq()
    return mtq.quantize(model, recipe.modelopt_config(), forward_loop)


def quantizers(model: nn.Module) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def save_amax(model: nn.Module, folder: Path) -> None:
    amax = {name: q.amax.detach().float().cpu().contiguous() for name, q in quantizers(model).items()}
    missing = [name for name, q in quantizers(model).items() if q.amax is None]
    if missing:
        raise QandcError(f"calibration left {len(missing)} quantizers without amax (e.g. {missing[0]}): the "
                         "calibration data never reached them")
    with atomic_path(folder / AMAX) as tmp:
        save_file(amax, str(tmp))


def apply_recipe(model: nn.Module, folder: str | Path) -> tuple[nn.Module, QuantRecipe]:
    """The fake-quant model of a recipe directory (amax loaded, nothing re-calibrated)."""
    folder = Path(folder)
    recipe = QuantRecipe.load(folder)
    try:
        recipe.cache_plan.reuse_set(model.branch_names)
    except QandcError as e:
        raise QandcError(f"{folder / RECIPE}: {e}") from None
    mtq = _mtq()
    mtq.quantize(model, recipe.modelopt_config(), None)
    amax = load_amax(folder)
    live = quantizers(model)
    if set(amax) != set(live):
        raise QandcError(f"{folder / AMAX}: amax for {len(amax)} quantizers, the recipe has {len(live)}")
    weight_axis = quantizer_formats(recipe.preset, recipe.fp8_weight_per_channel)[0]["axis"]
    for name, value in amax.items():
        layer, kind = name.rsplit(".", 1)
        want = model.get_submodule(layer).out_features if kind == "weight_quantizer" and weight_axis == 0 else 1
        if value.numel() != want:
            raise QandcError(f"{folder / AMAX}: amax of {name} has {value.numel()} values, expected {want}")
    set_amax(model, amax)
    return model, recipe


def load_amax(folder: str | Path) -> dict:
    """The stored amax of every enabled quantizer of a recipe directory, by quantizer name."""
    return read_safetensors(Path(folder) / AMAX)


def set_amax(model: nn.Module, amax: dict) -> None:
    """Give every enabled quantizer of `model` its stored amax (static scales: nothing is re-calibrated)."""
    device = next(model.parameters()).device
    for name, q in quantizers(model).items():
        q.amax = amax[name].to(device)


def load_vc(folder: str | Path) -> torch.Tensor | None:
    """The VC table (steps x channels) of a recipe folder; None when it has none."""
    path = Path(folder) / VC
    if not path.exists():
        return None
    tensors = read_safetensors(path)
    if "K" not in tensors or tensors["K"].ndim != 2:
        raise QandcError(f"{path}: no VC table 'K' of steps x channels (has: {', '.join(tensors) or 'nothing'})")
    return tensors["K"]
