"""The sensitivity report of a finished calibration: where the quantization error comes from.

Per layer: the output error when only that layer is quantized (with its calibrated amax). Per sampling step: the
output error of the whole quantized model. Both are measured on the calibration entries, each through the graph it
was calibrated on (full, reuse, reuse1, ...), against the full-precision model on the same inputs, cache factors
included: a reuse step's error is that of the branches it recomputes. Error = relative L2 over the entries compared,
sqrt(sum ||quantized - reference||^2 / sum ||reference||^2).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_path, write_json
from ..errors import QandcError
from ..requires import require
from ..formats.recipe import QuantRecipe, load_amax
from ..model.graphs import GraphSpec, engine_graphs
from ..progress import progress
from .pool import CalibrationEntry, Pool, replay, run_entries
from .quantize import apply_recipe, quantize, set_amax
from .selection import read_selection

REPORT, REPORT_PLOT = "report.json", "report.png"
PLOTTED_LAYERS = 20


def _selected_indices(folder: Path, recipe: QuantRecipe, pool: Pool) -> np.ndarray:
    if pool.pool_id != recipe.pool_id:
        raise QandcError(f"{folder}: the pool is not the one the recipe was calibrated on")
    return np.array(read_selection(folder / recipe.selector.get("selection", ""), len(pool.t))["indices"], dtype=int)


@torch.no_grad()
def _outputs(model, entries: list[CalibrationEntry], graphs: dict[str, GraphSpec],
             batch_size: int) -> list[torch.Tensor]:
    """Each entry's model output through its graph, in entry order."""
    outputs = [None] * len(entries)
    for index, parts in run_entries(model, entries, graphs, batch_size):
        for i, part in zip(index, parts):
            outputs[i] = part["out"]
    return outputs


def _squared_norms(outputs: list[torch.Tensor], reference: list[torch.Tensor] | None = None) -> np.ndarray:
    """Per entry: ||output - reference||^2, or ||output||^2 without a reference."""
    pairs = zip(outputs, reference or [0] * len(outputs))
    return torch.stack([(o.double() - r).pow(2).sum() for o, r in pairs]).cpu().numpy()


def _rel_error(squared_error: np.ndarray, squared_reference: np.ndarray) -> float:
    return float(np.sqrt(squared_error.sum() / squared_reference.sum()))


def _one_layer_quantized(model, recipe: QuantRecipe, layer: str, amax: dict):
    """A copy of `model` with only `layer` quantized, at its calibrated amax."""
    quantized = copy.deepcopy(model)
    quantize(quantized, dataclasses.replace(recipe, layers=[layer]), None)
    set_amax(quantized, amax)
    return quantized


def sensitivity_report(model, folder: str | Path, batch_size: int = 64) -> dict:
    """Per-layer and per-step quantization error of the calibration in `folder`; `model` is the full-precision
    DiT (left unchanged). Cost: one replay of the selected trajectories, then one pass over the calibration entries
    for the reference, one for the whole quantized model and one per quantized layer, each on a deep copy of the
    model (for DiT-XL/2, ~112 copies and passes)."""
    folder = Path(folder)
    recipe = QuantRecipe.load(folder)
    pool = Pool.load(folder)
    indices = _selected_indices(folder, recipe, pool)
    graphs = engine_graphs(recipe.cache_plan, model.branch_names)
    entries = replay(model, pool, indices, batch_size)
    reference = _outputs(model, entries, graphs, batch_size)
    squared_reference = _squared_norms(reference)

    whole, _ = apply_recipe(copy.deepcopy(model), folder)
    squared_error = _squared_norms(_outputs(whole, entries, graphs, batch_size), reference)
    del whole
    steps, kinds = pool.step[indices], np.array([e.graph for e in entries])
    per_step = []
    for step in np.unique(steps):
        at_step = steps == step
        per_step.append({"step": int(step), "kind": str(kinds[at_step][0]),
                         "rel_error": _rel_error(squared_error[at_step], squared_reference[at_step]),
                         "entries": int(at_step.sum())})

    amax = load_amax(folder)
    layers = []
    for layer in progress(recipe.layers, "sensitivity report"):
        quantized = _one_layer_quantized(model, recipe, layer, amax)
        layer_error = _squared_norms(_outputs(quantized, entries, graphs, batch_size), reference)
        layers.append({"name": layer, "rel_error": _rel_error(layer_error, squared_reference)})
    layers.sort(key=lambda row: -row["rel_error"])
    return {"preset": recipe.preset, "layers": layers, "per_step": per_step,
            "overall_rel_error": _rel_error(squared_error, squared_reference), "entries": len(entries)}


def write_report(report: dict, folder: str | Path) -> None:
    """report.png (the worst layers; the error per step), then report.json, whose presence marks a finished
    report."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "the report plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "the report plot").Figure
    folder = Path(folder)
    figure = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    by_layer, by_step = figure.subplots(1, 2, width_ratios=[1, 1.3])
    worst = report["layers"][:PLOTTED_LAYERS][::-1]
    by_layer.barh([row["name"] for row in worst], [row["rel_error"] for row in worst], color="tab:red")
    by_layer.set_title(f"{len(worst)} worst of {len(report['layers'])} layers, each quantized alone")
    by_layer.set_xlabel("relative output error")
    by_layer.tick_params(axis="y", labelsize=8)
    steps = report["per_step"]
    by_step.plot([row["step"] for row in steps], [row["rel_error"] for row in steps], color="0.7", zorder=1)
    kinds = sorted({row["kind"] for row in steps}, key=lambda kind: (kind != "full", kind))
    for i, kind in enumerate(kinds):  # full, reuse, reuse1, ...: at most 1 + MAX_REUSE_SETS kinds
        rows = [row for row in steps if row["kind"] == kind]
        by_step.scatter([row["step"] for row in rows], [row["rel_error"] for row in rows], marker="os^Dv"[i],
                        color=f"C{i}", label=f"{kind} steps", zorder=2)
    by_step.axhline(report["overall_rel_error"], linestyle="--", color="0.3", label="overall")
    by_step.set_title("whole model quantized, per sampling step")
    by_step.set_xlabel("sampling step (0 = noisiest)")
    by_step.set_ylabel("relative output error")
    by_step.legend()
    figure.suptitle(f"{report['preset']}: quantization error on {report['entries']} calibration entries")
    with atomic_path(folder / REPORT_PLOT) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    write_json(folder / REPORT, report)
