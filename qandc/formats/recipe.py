"""The quant recipe and the VC table: the files `calibrate` writes and every later stage reads.

A recipe directory holds recipe.json (preset, quantized layers, cache plan and the search it came from, sampler
settings, selector, lineage: the checkpoint's sha256, its path relative to the folder and its model config),
amax.safetensors (one amax per enabled ModelOpt quantizer, by quantizer name) and, once VC is fitted,
vc.safetensors (K, steps x channels). Reading them needs neither ModelOpt nor scikit-learn: a deployed runtime
reads the VC table and the engines the amax without importing calibration.

Presets (as ModelOpt quantizer attributes, max calibration, per-tensor activations):
- w8a8-int8: weights INT8 symmetric per output channel, activations INT8 symmetric per tensor (symmetric because
  TensorRT's INT8 Q/DQ is; the paper's activations are asymmetric).
- w8a8-fp8: weights FP8 e4m3 per tensor (per output channel with `fp8_weight_per_channel`), activations FP8 e4m3.
- w4a8: weights INT4 symmetric per output channel, activations INT8. Fake quant only: export and engines refuse it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..artifacts import atomic_path, mistyped, read_json, read_safetensors, write_json
from ..errors import QandcError
from ..sampling import CachePlan, SamplerDefaults

PRESETS = ("w8a8-int8", "w8a8-fp8", "w4a8")
EXPORTABLE = ("w8a8-int8", "w8a8-fp8")
FP8 = (4, 3)  # e4m3
RECIPE, AMAX, VC = "recipe.json", "amax.safetensors", "vc.safetensors"
FORMAT_VERSION = 1


def quantizer_formats(preset: str, fp8_weight_per_channel: bool = False) -> tuple[dict, dict]:
    """(weight quantizer cfg, input quantizer cfg) of a preset, as ModelOpt quantizer attributes."""
    if preset == "w8a8-int8":
        return {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}
    if preset == "w8a8-fp8":
        return {"num_bits": FP8, "axis": 0 if fp8_weight_per_channel else None}, {"num_bits": FP8, "axis": None}
    if preset == "w4a8":
        return {"num_bits": 4, "axis": 0}, {"num_bits": 8, "axis": None}
    raise QandcError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass
class QuantRecipe:
    """Everything that defines a quantized + cached pipeline, except the tensors (amax, VC) stored beside it.
    `plan` is a CachePlan (its JSON form is accepted and converted)."""

    preset: str
    layers: list[str]
    plan: CachePlan
    steps: int
    sampler: str
    cfg_scale: float
    fp8_weight_per_channel: bool = False
    keep: list[str] = field(default_factory=list)
    selector: dict = field(default_factory=dict)
    pool_id: str = ""
    checkpoint_sha256: str | dict = ""  # "" for a model in memory; a diffusers directory: sha256 by file name
    checkpoint: str = field(default="", compare=False)  # path relative to the recipe folder (moves are no change)
    model: dict | None = field(default=None, compare=False)  # the checkpoint's model config, heads included
    vc: dict | None = None   # {"form": "var" | "mse" | "nsr", "samples": ..., "seed": ...} once fitted
    # the `auto...` spec `plan` was searched by ("" for a given plan; the search is in plan.json, which guards a rerun)
    plan_search: str = field(default="", compare=False)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.plan, CachePlan):
            self.plan = CachePlan.from_dict(self.plan)

    @property
    def cache_plan(self) -> CachePlan:
        return self.plan

    @property
    def sampler_defaults(self) -> SamplerDefaults:
        return SamplerDefaults(self.steps, self.sampler, self.cfg_scale)

    def modelopt_config(self) -> dict:
        """The ModelOpt quantization config: every quantizer off, then each quantized Linear's two on."""
        weight, activation = quantizer_formats(self.preset, self.fp8_weight_per_channel)
        entries = [{"quantizer_name": "*", "enable": False}]
        for name in self.layers:
            entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": dict(weight), "enable": True})
            entries.append({"quantizer_name": f"{name}.input_quantizer", "cfg": dict(activation), "enable": True})
        return {"quant_cfg": entries, "algorithm": "max"}

    def to_dict(self) -> dict:
        return {**asdict(self), "plan": self.plan.to_dict()}

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / RECIPE, {**self.to_dict(), "modelopt_config": self.modelopt_config()})

    @classmethod
    def load(cls, folder: str | Path) -> "QuantRecipe":
        path = Path(folder) / RECIPE
        data = read_json(path, f"not a quant recipe folder (no {RECIPE})")
        data.pop("modelopt_config", None)
        if data.get("format_version") != FORMAT_VERSION:
            raise QandcError(f"{path}: recipe format {data.get('format_version')!r}, this qandc reads format "
                             f"{FORMAT_VERSION}")
        wrong = mistyped(cls, {k: v for k, v in data.items() if k != "plan"})
        if wrong:
            raise QandcError(f"{path}: not a quant recipe (wrong types: {', '.join(wrong)})")
        try:
            recipe = cls(**data)
            quantizer_formats(recipe.preset)
            SamplerDefaults.from_dict(recipe.sampler_defaults.to_dict())  # steps, sampler, a finite cfg_scale
        except (TypeError, QandcError) as e:
            raise QandcError(f"{path}: not a quant recipe ({e})") from None
        return recipe


def load_recipe_checkpoint(recipe_dir: str | Path, checkpoint: str | Path, **overrides):
    """The DiT of `checkpoint`, which the recipe was calibrated on (its sha256 checked first), loaded with the model
    config the recipe records (heads included: neither a sidecar nor num_heads is needed); `overrides` win."""
    from ..model import load_checkpoint
    from .lineage import check_recipe_checkpoint

    recipe = QuantRecipe.load(recipe_dir)
    check_recipe_checkpoint(Path(recipe_dir) / RECIPE, recipe.checkpoint_sha256, checkpoint)
    config = recipe.model if recipe.checkpoint_sha256 and recipe.model else {}
    return load_checkpoint(checkpoint, **{**config, **overrides})


def load_amax(folder: str | Path) -> dict[str, torch.Tensor]:
    """The stored amax of every enabled quantizer of a recipe directory, by quantizer name (float32). Values must
    be finite and not negative; zeros are judged where the model is (`calibration.apply_recipe`): legitimate only
    for weight channels that are all zero, as in a zero-initialised layer."""
    path = Path(folder) / AMAX
    amax = read_safetensors(path)
    for name, value in amax.items():
        _check_values(value, f"{path}: amax of {name}", value < 0, "negative")
    return {name: value.float() for name, value in amax.items()}


def _check_values(values: torch.Tensor, what: str, broken: torch.Tensor, problem: str) -> None:
    """Refuse NaN or inf in `values`, and the entries `broken` flags (`problem` says what they are), naming the
    first."""
    if not values.is_floating_point():
        raise QandcError(f"{what}: holds {values.dtype} values, not floating point")
    for mask, name in ((values.isnan(), "NaN"), (values.isinf(), "inf"), (broken, problem)):
        if mask.any():
            index = tuple(int(i) for i in mask.nonzero()[0])
            raise QandcError(f"{what}: {int(mask.sum())} of {values.numel()} values {name} (the first "
                             f"{values[index].item():g}, at index {list(index)})")


def write_amax(folder: str | Path, amax: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(Path(folder) / AMAX) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in amax.items()}, str(tmp))


def load_vc(folder: str | Path) -> torch.Tensor | None:
    """The VC table (steps x channels) of a recipe folder; None when it has none."""
    path = Path(folder) / VC
    if not path.exists():
        return None
    tensors = read_safetensors(path)
    if "K" not in tensors or tensors["K"].ndim != 2:
        raise QandcError(f"{path}: no VC table 'K' of steps x channels (has: {', '.join(tensors) or 'nothing'})")
    check_vc_values(tensors["K"], path)
    return tensors["K"]


def check_vc_values(K: torch.Tensor, source) -> None:
    """A VC table's factors are finite and positive (a factor scales a channel's spread about its mean)."""
    _check_values(K, f"{source}: VC table", K <= 0, "not positive")


def write_vc(folder: str | Path, K: torch.Tensor) -> None:
    from safetensors.torch import save_file

    check_vc_values(K.float(), Path(folder) / VC)
    with atomic_path(Path(folder) / VC) as tmp:
        save_file({"K": K.float().contiguous()}, str(tmp))


class VarianceCompensation:
    """The per-step correction of a VC table K (steps x channels): x̃ = μ + K[s, c] (x̂ − μ), μ the per-sample,
    per-channel spatial mean."""

    def __init__(self, K: torch.Tensor):
        self.K = K.float()

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if self.K.device != x.device:  # once: a copy from the host every step would wait for the device each time
            self.K = self.K.to(x.device)
        mu = x.mean(dim=(2, 3), keepdim=True)
        return mu + self.K[step][None, :, None, None] * (x - mu)


def vc_correction(K: torch.Tensor | None, steps: int, source, channels: int | None = None
                  ) -> VarianceCompensation | None:
    """The correction hook of a VC table (None without one); a table fitted for another step count (or, given
    `channels`, another channel count) is refused."""
    if K is None:
        return None
    if K.ndim != 2 or (channels is not None and K.shape[1] != channels):
        raise QandcError(f"{source}: VC table of shape {tuple(K.shape)}, expected ({steps}, {channels or 'C'})")
    if len(K) != steps:
        raise QandcError(f"{source}: VC table has {len(K)} steps, sampling uses {steps}")
    check_vc_values(K, source)
    return VarianceCompensation(K)
