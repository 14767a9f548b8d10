"""diffusers' cache hooks as peers (qandc.peers): the conversion to a diffusers DiT, the denoiser face that qandc's
sampler drives, and the count of the branch computations the hooks let run."""

import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.model import load_checkpoint
from qandc.model.checkpoint import to_diffusers
from qandc.model.dit import branch_flops
from qandc.model.graphs import engine_graphs, sample_inputs
from qandc.sampling import CachePlan, sample

pytest.importorskip("diffusers")
from qandc.peers import BranchCounter, calibrate_magcache, peer_denoiser  # noqa: E402

LABELS = [1, 2, 3]


def _diffusers_forward(transformer, x, t, y):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("overrides", [{}, {"freq_shift": 1, "guidance": "all", "mlp_norm_eps": 1e-5},
                                       {"block_embedders": True}])
def test_conversion_computes_the_same_function(overrides):
    model = tiny_model(**overrides)
    x, t, y = sample_inputs(model, batch=11)  # labels 0..10: the null class (10) included
    with torch.no_grad():
        expected = model(x, t, y)
    transformer = to_diffusers(model)
    assert rel_err(_diffusers_forward(transformer, x, t, y), expected) <= 1e-5
    for block in transformer.transformer_blocks:  # diffusers' own frequency shift would not do
        block.norm1.emb.time_proj.downscale_freq_shift = 1 - model.config.freq_shift
    assert rel_err(_diffusers_forward(transformer, x, t, y), expected) > 1e-4


@pytest.mark.parametrize("block_embedders", [False, True])
def test_conversion_is_the_inverse_of_loading_a_diffusers_folder(tmp_path, block_embedders):
    model = tiny_model(freq_shift=1, guidance="all", mlp_norm_eps=1e-5, block_embedders=block_embedders)
    to_diffusers(model).save_pretrained(tmp_path / "transformer")
    loaded = load_checkpoint(tmp_path / "transformer")
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_conversion_refuses_an_mlp_ratio_diffusers_cannot_build():
    with pytest.raises(QandcError, match="MLP ratio"):
        to_diffusers(tiny_model(mlp_ratio=2.0))


@pytest.mark.parametrize("sampler,guidance", [("ddpm", "first3"), ("ddim", "all")])
def test_denoiser_without_hooks_samples_as_qandc_does(sampler, guidance):
    model = tiny_model(guidance=guidance)
    expected = sample(model, LABELS, 5, sampler, cfg_scale=1.5, seed=4, sample_ids=[7, 8, 9])
    got = sample(peer_denoiser(model, 5), LABELS, 5, sampler, cfg_scale=1.5, seed=4, sample_ids=[7, 8, 9])
    assert rel_err(got, expected) <= 1e-5


def test_denoiser_refuses_cache_plans_and_other_step_counts():
    model = tiny_model()
    with pytest.raises(QandcError, match="plan=None"):
        sample(peer_denoiser(model, 4), LABELS, 4, "ddim", 1.5, seed=0, plan=CachePlan.interval(2))
    with pytest.raises(QandcError, match="4-step"):
        sample(peer_denoiser(model, 4), LABELS, 6, "ddim", 1.5, seed=0)


def _fraction(model, steps, method, settings, sampler="ddim"):
    denoiser = peer_denoiser(model, steps, method, settings)
    counter = BranchCounter(denoiser.transformer, model.config)
    out = sample(denoiser, LABELS, steps, sampler, cfg_scale=1.5, seed=0)
    return counter.fraction, out


def test_first_block_cache_fraction_runs_from_everything_to_the_first_block():
    model, steps = tiny_model(), 6
    assert _fraction(model, steps, "FirstBlockCache", {"threshold": 0.0})[0] == 1.0
    flops = branch_flops(model.config)
    first_block = (flops["blocks.0.attn"] + flops["blocks.0.mlp"]) / sum(flops.values())
    expected = (1 + (steps - 1) * first_block) / steps  # step 0 computes all, then only the first block runs
    assert _fraction(model, steps, "FirstBlockCache", {"threshold": 1e9})[0] == pytest.approx(expected, rel=1e-12)


def test_taylorseer_forecasts_the_dit_attention_and_mlp_modules():
    # computes at step 0 (warm-up), then at steps 2, 4 (every second step after the warm-up): half of 6 steps
    settings = {"cache_interval": 2, "disable_cache_before_step": 1, "max_order": 1}
    assert _fraction(tiny_model(), 6, "TaylorSeerCache", settings)[0] == pytest.approx(0.5, rel=1e-12)


def test_faster_cache_in_its_batch_order_counts_the_rows_it_skips():
    model, steps = tiny_model(), 4
    common = dict(unconditional_batch_timestep_skip_range=[-1, 1000], spatial_attention_block_skip_range=1,
                  spatial_attention_timestep_skip_range=[-1, 1000], attention_weight=0.5)
    plain = sample(peer_denoiser(model, steps), LABELS, steps, "ddim", cfg_scale=1.5, seed=0)
    # skipping the unconditional rows never: the same samples (qandc's [cond; uncond] batch swapped and back)
    fraction, out = _fraction(model, steps, "FasterCache", {**common, "unconditional_batch_skip_range": 1})
    assert fraction == 1.0 and rel_err(out, plain) <= 1e-5
    # every second call: half the rows at calls 1 and 3 of 4
    fraction, out = _fraction(model, steps, "FasterCache", {**common, "unconditional_batch_skip_range": 2})
    assert fraction == pytest.approx(0.75, rel=1e-12) and torch.isfinite(out).all()
    # at a call that skips the unconditional rows, the conditional ones (qandc's first half) are computed exactly
    denoiser = peer_denoiser(model, steps, "FasterCache", {**common, "unconditional_batch_skip_range": 2})
    full = engine_graphs(CachePlan.none(), model.branch_names)["full"]
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    y = torch.tensor([1, 2, 10, 10])
    for timestep in denoiser.diffusion.timestep_map[::-1][:2]:
        t = torch.full((4,), timestep)
        out = denoiser.forward_graph(full, {"x": x, "t": t, "y": y})["out"]
    with torch.no_grad():
        assert rel_err(out[:2], model(x[:2], t[:2], y[:2])) <= 1e-5


def test_sea_cache_skips_the_block_stack_between_its_kept_steps():
    # its first and last steps always run; with no limit on consecutive reuse and a threshold never reached, the
    # three between take the cached residual: only if its indicator sees the latents (else it runs everything)
    settings = {"threshold": 1e9, "max_consecutive_cached": 0}
    assert _fraction(tiny_model(), 5, "SeaCache", settings)[0] == pytest.approx(2 / 5, rel=1e-12)


def test_magcache_calibrates_one_ratio_a_step_and_then_skips():
    model, steps = tiny_model(), 6
    ratios = calibrate_magcache(model, LABELS, steps, "ddim", 1.5, seed=0)
    assert len(ratios) == steps and ratios[0] == 1.0
    settings = {"mag_ratios": ratios, "threshold": 1e9, "max_skip_steps": 2, "retention_ratio": 0.2}
    assert _fraction(model, steps, "MagCache", settings)[0] < 1.0
