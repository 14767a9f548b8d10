"""Calibration on a tiny model and a tiny pool: pool + exact replay, quant recipes through ModelOpt (CPU fake
quant), VC, resumable stages, and `generate --recipe`."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.model.graphs import TRUNK
from qandc.sampling import CachePlan, sample

pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import (CalibrationSettings, SelectorParams, apply_recipe, calibrate, collect_pool,  # noqa: E402
                               fit_vc, replay)
from qandc.calibration.quantize import quantizers  # noqa: E402
from qandc.formats.recipe import AMAX, RECIPE, QuantRecipe, VarianceCompensation, load_vc  # noqa: E402
from qandc.calibration.vc import fit_factor  # noqa: E402

PLAN = CachePlan.interval(3)


def _settings(**overrides):
    base = dict(preset="w8a8-int8", selector="tap", budget=24, plan=PLAN, pool_samples=6, steps=9,
                selector_params=SelectorParams(k=6), vc="var", vc_samples=6, batch_size=4)
    return CalibrationSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def model():
    return tiny_model(guidance="all")


@pytest.fixture(scope="module")
def recipe_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    calibrate(model, out, _settings())
    return out


def test_pool_records_every_step_and_replay_is_exact(model, tmp_path):
    pool = collect_pool(model, 5, 9, "ddpm", 1.5, PLAN, seed=3, batch_size=2, shards=tmp_path)
    assert pool.x.shape == (45, 4, 8, 8) and pool.full.tolist()[:4] == [True, False, False, True]
    assert pool.t[0] == 999 and pool.t[8] == 0
    selected = np.array([1, 7, 20, 44])  # samples 0, 0, 2, 4 at steps 1, 7, 2, 8; replayed in another batch
    entries = replay(model, pool, selected, batch_size=3)
    for k, entry in zip(selected, entries):
        x = entry.feeds["x"]
        assert x.shape == (2, 4, 8, 8)  # CFG-doubled
        assert torch.allclose(x[0], torch.from_numpy(pool.x[k]).float(), atol=2e-3 * x.abs().max())
        assert (entry.graph == "full") == bool(pool.full[k])
    assert sorted(entries[0].feeds) == sorted(["x", "t", "y", TRUNK])  # a reuse step: the cache (every branch) too


def test_recipe_round_trip_and_no_pickles(model, recipe_dir):
    recipe = QuantRecipe.load(recipe_dir)
    assert recipe.preset == "w8a8-int8" and recipe.cache_plan == PLAN and recipe.selector["name"] == "tap"
    assert set(recipe.layers) == {n for n, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    data = json.loads((recipe_dir / RECIPE).read_text())
    assert data["modelopt_config"]["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    q, _ = apply_recipe(copy.deepcopy(model), recipe_dir)
    again, _ = apply_recipe(copy.deepcopy(model), recipe_dir)
    assert len(quantizers(q)) == 2 * len(recipe.layers)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    assert torch.equal(q(x, t, y), again(x, t, y))  # static scales: the same every time
    err = rel_err(q(x, t, y), model(x, t, y))
    assert 1e-5 < err < 0.05  # really quantized, and still close


def test_presets_differ_and_keep_patterns(model, tmp_path):
    fp8 = calibrate(model, tmp_path / "fp8", _settings(preset="w8a8-fp8", selector="random", vc="none"))
    kept = calibrate(model, tmp_path / "keep", _settings(selector="uniform", vc="none", keep=["blocks.0.*"]))
    assert not any(name.startswith("blocks.0.") for name in kept.layers) and kept.layers
    int4 = calibrate(model, tmp_path / "w4", _settings(preset="w4a8", selector="kmeans", vc="none"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), torch.tensor([3, 4])
    ref = model(x, t, y)
    errors = {name: rel_err(apply_recipe(copy.deepcopy(model), tmp_path / name)[0](x, t, y), ref)
              for name in ("fp8", "keep", "w4")}
    assert errors["w4"] > errors["keep"]  # 4-bit weights cost more than 8-bit with a block kept
    assert fp8.preset == "w8a8-fp8" and int4.preset == "w4a8"


def test_rerun_skips_finished_stages_and_refuses_other_settings(model, recipe_dir):
    amax_time = (recipe_dir / AMAX).stat().st_mtime_ns
    calibrate(model, recipe_dir, _settings())
    assert (recipe_dir / AMAX).stat().st_mtime_ns == amax_time
    with pytest.raises(QandcError, match="other settings"):
        calibrate(model, recipe_dir, _settings(budget=12))


def test_vc_factor_recovers_a_known_scale():
    ref = torch.randn(64, 3, 8, 8)
    scaled = ref * torch.tensor([1.5, 1.0, 0.5])[None, :, None, None]
    for form in ("mse", "var"):  # exact: the centred scaled sample maps back by 1/scale
        K = fit_factor(scaled, ref, form)
        assert torch.allclose(K, torch.tensor([1 / 1.5, 1.0, 2.0]), rtol=1e-3), form
    nsr = fit_factor(scaled, ref, "nsr")  # weighted: the same direction, not the same value
    assert nsr[0] < 1 < nsr[2] and abs(nsr[1] - 1) < 1e-3
    corrected = VarianceCompensation(fit_factor(scaled, ref, "var")[None])(0, scaled)
    centred = lambda v: v - v.mean(dim=(2, 3), keepdim=True)  # noqa: E731 - VC keeps the mean, fixes the spread
    assert rel_err(centred(corrected), centred(ref)) < 1e-4
    assert torch.allclose(corrected.mean(dim=(2, 3)), scaled.mean(dim=(2, 3)), atol=1e-5)


def test_vc_table_is_fitted_per_step_and_used_by_generate(model, recipe_dir, tmp_path):
    K = load_vc(recipe_dir)
    assert K.shape == (9, 4) and torch.isfinite(K).all() and (K > 0).all()
    q, recipe = apply_recipe(copy.deepcopy(model), recipe_dir)
    again = fit_vc(model, q, torch.arange(6) % 10, 9, "ddpm", 1.5, 1, PLAN, "var")
    assert torch.allclose(again, K)  # deterministic: same seeds, same noise
    from qandc.cli import main
    from qandc.model import save_checkpoint
    save_checkpoint(model, tmp_path / "m.pt")
    args = ["generate", "--checkpoint", str(tmp_path / "m.pt"), "--recipe", str(recipe_dir), "--labels", "1,2",
            "--steps", "9", "--seed", "4"]
    assert main(args + ["--out", str(tmp_path / "vc")]) == 0
    assert main(args + ["--no-vc", "--out", str(tmp_path / "novc")]) == 0
    with_vc = np.load(tmp_path / "vc" / "samples.npz")["samples"]
    direct = sample(q, [1, 2], 9, cfg_scale=1.5, seed=4, plan=PLAN, correction=VarianceCompensation(K))
    assert np.allclose(with_vc, direct.numpy(), rtol=1e-4, atol=1e-4 * np.abs(with_vc).max())
    assert not np.allclose(with_vc, np.load(tmp_path / "novc" / "samples.npz")["samples"])
    config = json.loads((tmp_path / "vc" / "config.json").read_text())
    assert (tmp_path / "vc" / config["recipe"]).resolve() == recipe_dir.resolve() and config["vc"] is True
    assert not Path(config["recipe"]).is_absolute() and not Path(config["checkpoint"]).is_absolute()
    assert config["caption"] == f"{PLAN.describe()} · w8a8-int8 (fake quant) + VC · ddpm 9 steps · CFG 1.5 · seed 4"
    assert main(args[:-2] + ["--steps", "10", "--out", str(tmp_path / "x")]) == 2  # VC table is for 9 steps
    assert main(args + ["--cache", "interval=2", "--out", str(tmp_path / "y")]) == 2  # not the recipe's plan


def test_bad_recipes(tmp_path, model, recipe_dir):
    with pytest.raises(QandcError, match="no recipe.json"):
        apply_recipe(copy.deepcopy(model), tmp_path)
    (tmp_path / RECIPE).write_text(json.dumps({**json.loads((recipe_dir / RECIPE).read_text()), "format_version": 9}))
    with pytest.raises(QandcError, match="format 9"):
        QuantRecipe.load(tmp_path)
    with pytest.raises(QandcError, match="unknown VC"):
        calibrate(model, tmp_path / "v", _settings(vc="magic"))


@pytest.mark.parametrize("spec", ["auto:reuse=0.5", "auto:compute=0.5,forecast=1"])
def test_calibrate_with_a_searched_plan(model, tmp_path, spec):
    recipe = calibrate(model, tmp_path, _settings(plan=spec, selector="random", vc="none"))
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert recipe.plan.to_dict() == saved["plan"] and saved["spec"] == spec
    assert CachePlan.parse(str(tmp_path / "plan.json")) == recipe.cache_plan  # --cache takes the search's file
    if spec.startswith("auto:reuse"):
        assert saved["search"]["reuse_fraction"] >= 0.5
    else:
        assert saved["search"]["compute_fraction"] <= 0.5 and recipe.cache_plan.forecast == 1
    assert recipe.cache_plan.full_steps(9)[0]
