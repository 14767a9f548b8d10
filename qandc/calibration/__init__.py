"""Stage 2: calibration pool along cached trajectories, sample selection (TAP and baselines), ModelOpt
quantization of both paths into a quant recipe, and variance compensation (VC) factors. The recipe's files are read
through `qandc.formats.recipe`, which needs none of this stage's libraries."""

from .calibrate import CalibrationSettings, calibrate
from .plan_search import PlanSearch, parse_auto
from .pool import Pool, collect_pool, replay
from .quantize import apply_recipe
from .selection import SELECTORS, SelectorParams, select
from .vc import VC_FORMS, fit_vc

__all__ = ["SELECTORS", "VC_FORMS", "CalibrationSettings", "PlanSearch", "Pool", "SelectorParams", "apply_recipe",
           "calibrate", "collect_pool", "fit_vc", "parse_auto", "replay", "select"]
