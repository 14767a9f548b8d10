import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.sampling import sampler
from qandc.sampling import CachePlan, Diffusion, draw_noise, sample, sample_generator, space_timesteps


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 25, 50, 100, 250, 333, 999, 1000])
def test_respacing_matches_the_original(steps):
    assert space_timesteps(1000, steps) == sorted(ref.space_timesteps(1000, [steps]))
    d, r = Diffusion(steps), ref.Schedule(steps)
    assert d.timestep_map == r.map
    assert np.allclose(d.betas, r.betas, rtol=1e-12)


def test_respacing_rejects_impossible_counts():
    with pytest.raises(QandcError):
        space_timesteps(1000, 0)
    with pytest.raises(QandcError):
        Diffusion(1001)


def _model_fn(model, cfg_scale, labels, channels):
    """The original wrapped model: original timesteps, CFG on [x; x] with null labels."""
    def fn(x, t):
        n = len(x)
        y = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
        tt = torch.full((2 * n,), t, dtype=torch.long)
        with torch.no_grad():
            out = model(torch.cat([x, x]).float(), tt, y).double()
        return ref.guided(out, cfg_scale, channels)[:n]
    return fn


@pytest.mark.parametrize("guidance,channels", [("first3", 3), ("all", 4)])
def test_ddim_reproduces_the_original_loop(guidance, channels):
    model = tiny_model(guidance=guidance)
    labels = torch.tensor([1, 4, 9])
    noise = torch.randn(3, 4, 8, 8)
    got = sample(model, labels, 10, "ddim", cfg_scale=2.5, noise=noise)
    expected = ref.ddim_loop(_model_fn(model, 2.5, labels, channels), ref.Schedule(10), noise.double())
    assert rel_err(got, expected) <= 1e-3


def test_ddpm_reproduces_the_original_loop(model):
    labels = torch.tensor([0, 5])
    got = sample(model, labels, 10, "ddpm", cfg_scale=3.0, seed=7)
    gens = [sample_generator(7, i) for i in range(2)]
    x = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]).double()
    noises = [torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]).double() for _ in range(9)]
    expected = ref.ddpm_loop(_model_fn(model, 3.0, labels, 3), ref.Schedule(10), x, noises)
    assert rel_err(got, expected) <= 1e-3


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 32, 32), (3, 5, 7)])
def test_noise_drawn_at_once_equals_the_draws_step_by_step(shape):
    gens = [sample_generator(3, i) for i in range(3)]
    at_once = draw_noise(gens, shape, 5)
    gens = [sample_generator(3, i) for i in range(3)]
    step_by_step = torch.stack([draw_noise(gens, shape) for _ in range(5)], dim=1)
    assert at_once.shape == (3, 5, *shape) and torch.equal(at_once, step_by_step)


@pytest.mark.parametrize("shape", [(4, 16, 16), (3, 5, 7)])
def test_a_large_draw_spread_over_threads_gives_each_sample_its_own_numbers(shape, monkeypatch):
    """Above PARALLEL_DRAW_VALUES the samples are drawn on several threads: each sample still gets the numbers its
    own generator gives, in the batch's order, whatever thread drew it."""
    monkeypatch.setattr(sampler, "DRAW_THREADS", 3)  # shares of 5, 5, 5 and 2 samples on 3 threads
    monkeypatch.setattr(sampler, "_DRAW_POOL", [])
    monkeypatch.setattr(sampler, "PARALLEL_DRAW_VALUES", 1000)
    n, count = 17, 9
    drawn = draw_noise([sample_generator(11, i) for i in range(n)], shape, count)
    alone = torch.stack([draw_noise([sample_generator(11, i)], shape, count)[0] for i in range(n)])
    assert sampler._DRAW_POOL and torch.equal(drawn, alone)
    first = draw_noise([sample_generator(11, i) for i in range(n)], shape)
    assert torch.equal(first, alone[:, 0])


def test_unguided_sampling_calls_the_plain_model(model):
    noise = torch.randn(2, 4, 8, 8)
    got = sample(model, [2, 3], 5, "ddim", noise=noise)
    labels = torch.tensor([2, 3])

    def plain(x, t):
        with torch.no_grad():
            return model(x.float(), torch.full((len(x),), t), labels).double()
    assert rel_err(got, ref.ddim_loop(plain, ref.Schedule(5), noise.double())) <= 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interval_one_equals_uncached_exactly(model, sampler):
    kwargs = dict(steps=8, sampler=sampler, cfg_scale=2.0, seed=3)
    uncached = sample(model, [1, 2, 3], **kwargs)
    assert torch.equal(sample(model, [1, 2, 3], plan=CachePlan.interval(1), **kwargs), uncached)
    assert torch.equal(sample(model, [1, 2, 3], plan=CachePlan.interval(1, regate=True), **kwargs), uncached)


def test_cached_sampling_differs_but_stays_close(model):
    kwargs = dict(steps=20, sampler="ddim", cfg_scale=1.5, seed=0)
    uncached = sample(model, [1, 2], **kwargs)
    for plan in (CachePlan.interval(2), CachePlan.interval(2, "mlp", regate=True),
                 CachePlan.from_steps([True, False] * 10, branches=["blocks.0.attn"])):
        cached = sample(model, [1, 2], plan=plan, **kwargs)
        assert 0 < rel_err(cached, uncached) < 0.5


class _Counting:
    """Wraps a model and counts which graph each step runs."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config, self.branch_names = model.config, model.branch_names

    @property
    def device(self):
        return self.model.device

    def forward_graph(self, spec, feeds):
        self.calls.append(spec.name)
        return self.model.forward_graph(spec, feeds)


def test_plan_schedule_drives_the_paths(model):
    counting = _Counting(model)
    sample(counting, [1], 7, plan=CachePlan.interval(3))
    assert counting.calls == ["full", "reuse", "reuse", "full", "reuse", "reuse", "full"]


def test_noise_is_keyed_per_sample(model):
    batch = sample(model, [1, 2, 3, 4], 6, "ddpm", cfg_scale=2.0, seed=11)
    alone = sample(model, [3], 6, "ddpm", cfg_scale=2.0, seed=11, sample_ids=[2])
    assert rel_err(alone, batch[2:3]) < 1e-5  # batch size and position do not change a sample
    assert rel_err(sample(model, [1], 6, "ddpm", cfg_scale=2.0, seed=12), batch[:1]) > 1e-2


def test_a_seed_per_sample_keys_each_as_its_own_seed_would(model):
    """A batch merging requests of different seeds (qandc serve): each sample is the one its (seed, id) gives."""
    mixed = sample(model, [3, 5], 6, "ddpm", cfg_scale=2.0, seed=[11, 12], sample_ids=[2, 0])
    assert rel_err(mixed[:1], sample(model, [1, 2, 3], 6, "ddpm", cfg_scale=2.0, seed=11)[2:3]) < 1e-5
    assert rel_err(mixed[1:], sample(model, [5], 6, "ddpm", cfg_scale=2.0, seed=12)) < 1e-5
    with pytest.raises(QandcError, match="1 seeds for 2 labels"):
        sample(model, [3, 5], 2, seed=[11])


def test_correction_hook_is_called_each_step(model):
    seen = []

    def shrink(step, x):
        seen.append(step)
        return x * 0.5
    plain = sample(model, [1], 4, "ddim", seed=0)
    corrected = sample(model, [1], 4, "ddim", seed=0, correction=shrink)
    assert seen == [0, 1, 2, 3] and not torch.allclose(plain, corrected)


@pytest.mark.parametrize("labels", [[10], [-1], [0, 11], []])
def test_labels_outside_the_classes_are_refused(model, labels):
    with pytest.raises(QandcError):
        sample(model, labels, 2)


def test_bad_sampler_and_noise_shape(model):
    with pytest.raises(QandcError, match="sampler"):
        sample(model, [1], 2, "euler")
    with pytest.raises(QandcError, match="noise"):
        sample(model, [1], 2, noise=torch.zeros(1, 4, 4, 4))


def test_plan_grammar():
    assert CachePlan.parse("none") == CachePlan.none()
    assert CachePlan.parse("interval=3") == CachePlan.interval(3)
    assert CachePlan.parse("interval=2,branches=attn,regate=1") == CachePlan.interval(2, "attn", True)
    plan = CachePlan.parse("interval=4,branches=blocks.0.attn+blocks.1.mlp")
    assert plan.branches == ("blocks.0.attn", "blocks.1.mlp")
    assert CachePlan.parse("interval=3,forecast=2,factors=bf16") == CachePlan.interval(3, forecast=2,
                                                                                         factors="bf16")
    for bad in ["interval=0", "interval=x", "every=2", "interval=2,regate=2", "interval=2,interval=3",
                "branches=all", "interval=2,branches=ffn", "missing.json", "interval=2,forecast=3",
                "interval=2,forecast=-1", "interval=2,factors=fp16"]:
        with pytest.raises(QandcError):
            CachePlan.parse(bad)


@pytest.mark.parametrize("steps", [10, 50, 250])
def test_default_plan_shape_has_the_default_compute_and_forecast(steps):
    from qandc.sampling.plan import DEFAULT_COMPUTE, DEFAULT_FORECAST, default_plan_shape

    plan = default_plan_shape(steps)
    full = plan.full_steps(steps)
    assert plan.forecast == DEFAULT_FORECAST and full[0]
    assert sum(full) == round(DEFAULT_COMPUTE * steps)
    at = [s for s in range(steps) if full[s]] + [steps]
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced


def test_plan_json_file(tmp_path, model):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(CachePlan.from_steps(["full", "reuse", "full"], ["blocks.1.mlp"]).to_dict()))
    plan = CachePlan.parse(str(path))
    assert plan.full_steps(3) == [True, False, True]
    with pytest.raises(QandcError, match="3 steps"):
        plan.full_steps(4)
    path.write_text(json.dumps({"schedule": ["reuse", "full"]}))
    with pytest.raises(QandcError, match="first step"):
        CachePlan.parse(str(path))
    path.write_text("{not json")
    with pytest.raises(QandcError, match="JSON"):
        CachePlan.parse(str(path))


def test_plan_naming_missing_branches_is_refused(model):
    with pytest.raises(QandcError, match="blocks.7.attn"):
        sample(model, [1], 4, plan=CachePlan.interval(2, ["blocks.7.attn"]))
    assert CachePlan.interval(2, "attn").reuse_set(model.branch_names) == ["blocks.0.attn", "blocks.1.attn"]


plans = st.builds(
    CachePlan,
    every=st.integers(1, 50),
    schedule=st.one_of(st.none(), st.lists(st.sampled_from(["full", "reuse"]), min_size=0, max_size=30)
                       .map(lambda s: ["full"] + s)),
    branches=st.one_of(st.sampled_from(["all", "attn", "mlp"]),
                       st.lists(st.builds(lambda i, k: f"blocks.{i}.{k}", st.integers(0, 27),
                                          st.sampled_from(["attn", "mlp"])), unique=True).map(tuple)),
    regate=st.booleans(),
    forecast=st.sampled_from([0, 1, 2]),
    factors=st.sampled_from(["float32", "bf16"]),
)


@settings(max_examples=200, deadline=None)
@given(plans)
def test_plan_survives_json(plan):
    again = CachePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    n = len(plan.schedule) if plan.schedule else 17
    steps = again.full_steps(n)
    assert steps[0] and len(steps) == n
