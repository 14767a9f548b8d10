"""Quantization with NVIDIA ModelOpt into the quant recipe (`qandc.formats.recipe`: presets, recipe.json, amax).

Default scope: every Linear inside the DiT blocks; embedders and the final layer stay in high precision; `keep`
patterns (fnmatch on module names, e.g. "blocks.0.*" or "*.adaLN_modulation.1") keep more. Loading a recipe
re-creates the fake-quant model without re-calibrating and without pickles.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch.nn as nn

from ..chatter import quiet
from ..errors import QandcError
from ..requires import require
from ..formats.recipe import AMAX, RECIPE, QuantRecipe, load_amax, quantizer_formats, write_amax


def _mtq():
    require("modelopt.torch.export", "quantization")  # imported by mtq.quantize()
    return require("modelopt.torch.quantization", "quantization")


def quantized_layers(model: nn.Module, keep: list[str] = ()) -> list[str]:
    """Names of the Linear layers inside the blocks that are quantized (those not matching a `keep` pattern)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in keep)]


def quantize(model: nn.Module, recipe: QuantRecipe, forward_loop) -> nn.Module:
    """Insert ModelOpt fake quantizers per the recipe and calibrate them (max) with `forward_loop(model)`, if any."""
    mtq = _mtq()
    with quiet():  # "Inserted N quantizers" on every call
        return mtq.quantize(model, recipe.modelopt_config(), forward_loop)


def quantizers(model: nn.Module) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def save_amax(model: nn.Module, folder: Path) -> None:
    amax = {name: q.amax for name, q in quantizers(model).items()}
    missing = [name for name, q in quantizers(model).items() if q.amax is None]
    if missing:
        raise QandcError(f"calibration left {len(missing)} quantizers without amax (e.g. {missing[0]}): the "
                         "calibration data never reached them")
    write_amax(folder, amax)


def apply_recipe(model: nn.Module, folder: str | Path) -> tuple[nn.Module, QuantRecipe]:
    """The fake-quant model of a recipe directory (amax loaded, nothing re-calibrated)."""
    folder = Path(folder)
    recipe = QuantRecipe.load(folder)
    try:
        recipe.cache_plan.reuse_set(model.branch_names)
    except QandcError as e:
        raise QandcError(f"{folder / RECIPE}: {e}") from None
    quantize(model, recipe, None)
    amax = load_amax(folder)
    live = quantizers(model)
    if set(amax) != set(live):
        raise QandcError(f"{folder / AMAX}: amax for {len(amax)} quantizers, the recipe has {len(live)}")
    weight_axis = quantizer_formats(recipe.preset, recipe.fp8_weight_per_channel)[0]["axis"]
    for name, value in amax.items():
        amax[name] = _checked_amax(model, name, value, weight_axis, folder / AMAX)
    set_amax(model, amax)
    return model, recipe


def _checked_amax(model: nn.Module, name: str, value, weight_axis, path: Path):
    """A stored amax in the shape ModelOpt uses — (out, 1) per output channel, () per tensor — whatever shape of the
    right count it was stored in. A zero amax quantizes everything to zero: legitimate only for weight channels that
    are all zero (a zero-initialised layer), refused elsewhere."""
    layer, kind = name.rsplit(".", 1)
    linear = model.get_submodule(layer)
    per_channel = kind == "weight_quantizer" and weight_axis == 0
    want = linear.out_features if per_channel else 1
    if value.numel() != want:
        raise QandcError(f"{path}: amax of {name} has {value.numel()} values, expected {want}")
    value = value.reshape(want, 1) if per_channel else value.reshape(())
    if kind != "weight_quantizer":
        live = value > 0
    else:
        weight = linear.weight.detach().abs().amax(dim=1, keepdim=True).cpu()  # amax files are read to the CPU
        live = (value > 0) | (weight == 0 if per_channel else weight.max() == 0)
    if not live.all():
        what = "weight channels that are not zero" if kind == "weight_quantizer" else "an activation"
        raise QandcError(f"{path}: amax of {name} is 0 for {what}, which it would quantize to nothing (a zero amax "
                         "fits only an all-zero weight channel)")
    return value


def set_amax(model: nn.Module, amax: dict) -> None:
    """Give every enabled quantizer of `model` its stored amax (static scales: nothing is re-calibrated)."""
    device = next(model.parameters()).device
    for name, q in quantizers(model).items():
        q.amax = amax[name].to(device)
