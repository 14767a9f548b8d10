"""The sensitivity report on a tiny model: one row per quantized layer and per sampled step, a layer made sensitive
on purpose ranks first and keeping it helps, and `qandc calibrate --report` writes report.json and report.png."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.errors import QandcError
from qandc.sampling import CachePlan

pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import CalibrationSettings, Pool, calibrate  # noqa: E402
from qandc.calibration.sensitivity import REPORT, REPORT_PLOT, sensitivity_report  # noqa: E402

PLAN = CachePlan.interval(3, branches="attn")  # reuse steps recompute the MLPs: quantized layers on both paths
SENSITIVE = "blocks.1.attn.proj"
OUTLIER_CHANNEL, OUTLIER_SCALE = 5, 1000.0


def _settings(**overrides):
    base = dict(preset="w8a8-int8", selector="uniform", budget=24, plan=PLAN, pool_samples=6, steps=9, vc="none",
                batch_size=4)
    return CalibrationSettings(**{**base, **overrides})


def _with_activation_outlier(model):
    """Scale one value channel of blocks.1 attention by OUTLIER_SCALE and the matching proj input column down by as
    much: the full-precision function is unchanged, but proj's per-tensor INT8 input quantizer now spends its range
    on one channel (the others round to zero) and its per-channel weights round that column to zero."""
    d = model.config.hidden_size
    attention = model.blocks[1].attn
    with torch.no_grad():
        attention.qkv.weight[2 * d + OUTLIER_CHANNEL] *= OUTLIER_SCALE
        attention.qkv.bias[2 * d + OUTLIER_CHANNEL] *= OUTLIER_SCALE
        attention.proj.weight[:, OUTLIER_CHANNEL] /= OUTLIER_SCALE
    return model


@pytest.fixture(scope="module")
def model():
    return _with_activation_outlier(tiny_model(guidance="all"))


@pytest.fixture(scope="module")
def recipe_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sensitive")
    calibrate(model, out, _settings(), report=True)
    return out


def test_report_has_a_row_per_layer_and_per_sampled_step(model, recipe_dir):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    report = sensitivity_report(model, recipe_dir, batch_size=3)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the model is left unchanged
    written = json.loads((recipe_dir / REPORT).read_text())  # by calibrate, in batches of 4
    for key, row_key in (("layers", "name"), ("per_step", "step")):
        errors = lambda r: {row[row_key]: row["rel_error"] for row in r[key]}  # noqa: E731
        assert errors(report) == pytest.approx(errors(written), rel=0.05)  # float32 batching noise
    recipe = json.loads((recipe_dir / "recipe.json").read_text())
    assert sorted(row["name"] for row in report["layers"]) == sorted(recipe["layers"])
    errors = [row["rel_error"] for row in report["layers"]]
    assert errors == sorted(errors, reverse=True)
    pool = Pool.load(recipe_dir)
    selected = np.array(json.loads((recipe_dir / "selection-uniform.json").read_text())["indices"])
    full = PLAN.full_steps(9)
    assert [row["step"] for row in report["per_step"]] == sorted(set(pool.step[selected].tolist()))
    assert [row["kind"] for row in report["per_step"]] == ["full" if full[row["step"]] else "reuse"
                                                         for row in report["per_step"]]
    assert {row["kind"] for row in report["per_step"]} == {"full", "reuse"}
    assert sum(row["entries"] for row in report["per_step"]) == report["entries"] == len(selected)
    errors += [row["rel_error"] for row in report["per_step"]] + [report["overall_rel_error"]]
    assert all(np.isfinite(e) and e > 0 for e in errors)
    assert report["preset"] == "w8a8-int8"


def test_sensitive_layer_ranks_first_and_keeping_it_lowers_the_error(model, recipe_dir, tmp_path):
    report = json.loads((recipe_dir / REPORT).read_text())
    assert report["layers"][0]["name"] == SENSITIVE
    assert report["layers"][0]["rel_error"] > 10 * report["layers"][1]["rel_error"]
    calibrate(model, tmp_path, _settings(keep=[SENSITIVE]), report=True)
    kept = json.loads((tmp_path / REPORT).read_text())
    assert SENSITIVE not in [row["name"] for row in kept["layers"]]
    assert len(kept["layers"]) == len(report["layers"]) - 1
    assert kept["overall_rel_error"] < report["overall_rel_error"] / 10


def test_calibrate_cli_writes_the_report_also_on_a_rerun(tmp_path):
    from qandc.cli import main
    from qandc.model import save_checkpoint

    save_checkpoint(tiny_model(guidance="all"), tmp_path / "m.pt")
    out = tmp_path / "recipe"
    args = ["calibrate", "--checkpoint", str(tmp_path / "m.pt"), "--selector", "uniform", "--pool-samples", "4",
            "--steps", "6", "--samples", "12", "--clusters", "4", "--vc", "none", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert not (out / REPORT).exists()
    assert main(args + ["--report"]) == 0  # the calibration stages are skipped, the report is written
    report = json.loads((out / REPORT).read_text())
    assert report["preset"] == "w8a8-fp8" and len(report["per_step"]) > 0 and report["layers"]
    assert (out / REPORT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_report_needs_a_finished_calibration(tmp_path):
    with pytest.raises(QandcError, match="no recipe.json"):
        sensitivity_report(tiny_model(), tmp_path)
