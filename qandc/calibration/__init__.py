"""Stage 2: calibration pool along cached trajectories, sample selection (TAP and baselines), ModelOpt
quantization of both paths into a quant recipe, and variance compensation (VC) factors."""

from .calibrate import CalibrationSettings, calibrate
from .pool import Pool, collect_pool, replay
from .quantize import EXPORTABLE, PRESETS, QuantRecipe, apply_recipe, load_vc
from .selection import SELECTORS, SelectorParams, select
from .vc import VC_FORMS, VarianceCompensation, fit_vc

__all__ = ["EXPORTABLE", "PRESETS", "SELECTORS", "VC_FORMS", "CalibrationSettings", "Pool", "QuantRecipe",
           "SelectorParams", "VarianceCompensation", "apply_recipe", "calibrate", "collect_pool", "fit_vc",
           "load_vc", "replay", "select"]
