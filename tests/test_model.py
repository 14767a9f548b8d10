import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import reference as ref
from conftest import rel_err, tiny_model
from qandc.model import DIT_CONFIGS, DiT, guide, named_config


def _inputs(model, n=3):
    c = model.config
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, c.num_classes + 1, (n,))  # the null class included
    return x, t, y


@pytest.mark.parametrize("overrides", [
    {}, {"learn_sigma": False}, {"patch_size": 4, "depth": 3}, {"in_channels": 1, "num_heads": 2},
    {"freq_shift": 1, "mlp_norm_eps": 1e-5},
])
def test_forward_matches_the_dit_equations(overrides):
    model = tiny_model(seed=3, **overrides)
    c = model.config
    x, t, y = _inputs(model)
    expected = ref.dit_forward(model.state_dict(), x, t, y, heads=c.num_heads, depth=c.depth, patch=c.patch_size,
                               learn_sigma=c.learn_sigma, freq_shift=c.freq_shift, mlp_eps=c.mlp_norm_eps)
    assert rel_err(model(x, t, y), expected) <= 1e-5


@pytest.mark.parametrize("guidance,channels", [("first3", 3), ("all", 4)])
def test_forward_with_cfg_matches_the_original(guidance, channels):
    model = tiny_model(guidance=guidance)
    x, t, _ = _inputs(model, 2)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.tensor([3, 7, 10, 10])
    got = model.forward_with_cfg(x2, t2, y2, 4.0)
    expected = ref.guided(model(x2, t2, y2), 4.0, channels)
    assert torch.allclose(got, expected, atol=1e-6)
    # the learned-sigma channels pass through unguided in both modes
    assert torch.equal(got[:, 4:], model(x2, t2, y2)[:, 4:])


def test_named_configs_follow_the_dit_paper():
    # DiT-XL/2 has 675M parameters (DiT paper, table 4)
    with torch.device("meta"):
        xl = DiT(named_config("DiT-XL/2"))
    assert round(sum(p.numel() for p in xl.parameters()) / 1e6) == 675
    assert len(DIT_CONFIGS) == 12
    with pytest.raises(ValueError):
        named_config("DiT-M/2")


def test_full_path_emits_cache_and_equals_forward(model):
    x, t, y = _inputs(model)
    out, cache = model.forward_full(x, t, y)
    assert torch.equal(out, model(x, t, y))
    assert sorted(cache) == sorted(model.branch_names)
    assert cache["blocks.1.mlp"].shape == (3, 16, 32)


@pytest.mark.parametrize("regate", [False, True])
def test_reuse_with_a_fresh_cache_reproduces_full(model, regate):
    x, t, y = _inputs(model)
    out, cache = model.forward_full(x, t, y, regate=regate)
    assert rel_err(model.forward_reuse(x, t, y, cache, regate=regate), out) < 1e-6


def test_reuse_takes_cached_branches_and_computes_the_rest(model):
    x, t, y = _inputs(model)
    _, cache = model.forward_full(x, t, y, branches=["blocks.0.mlp"])
    assert list(cache) == ["blocks.0.mlp"]
    x_next, t_next = x + 0.3 * torch.randn_like(x), t // 2
    reused = model.forward_reuse(x_next, t_next, y, cache)
    fresh = model(x_next, t_next, y)
    assert rel_err(reused, fresh) > 1e-4  # the cached branch is stale, so the output moves
    poisoned = {"blocks.0.mlp": 10 * torch.randn_like(cache["blocks.0.mlp"])}
    assert rel_err(model.forward_reuse(x_next, t_next, y, poisoned), reused) > 1e-2  # and it is really used


def test_regate_multiplies_by_the_current_gate(model):
    x, t, y = _inputs(model)
    _, ungated = model.forward_full(x, t, y, branches=["blocks.0.attn"], regate=True)
    _, gated = model.forward_full(x, t, y, branches=["blocks.0.attn"], regate=False)
    gate = model.blocks[0].adaLN_modulation(model.t_embedder(t) + model.y_embedder(y)).chunk(6, dim=1)[2]
    assert torch.allclose(gated["blocks.0.attn"], gate[:, None] * ungated["blocks.0.attn"], atol=1e-6)


def test_reuse_all_step_is_cheaper(model):
    x, t, y = _inputs(model)
    _, cache = model.forward_full(x, t, y)
    with FlopCounterMode(display=False) as full:
        model.forward_full(x, t, y)
    with FlopCounterMode(display=False) as reuse:
        model.forward_reuse(x, t, y, cache)
    assert reuse.get_total_flops() < 0.2 * full.get_total_flops()


def test_guide_leaves_unguided_channels(model):
    out = torch.randn(4, 8, 8, 8)
    g = guide(out, 1.0, model.config)  # scale 1: both halves take the conditional prediction
    assert torch.allclose(g[:2], out[:2], atol=1e-6) and torch.allclose(g[2:, :3], out[:2, :3], atol=1e-6)
    assert torch.equal(g[:, 3:], out[:, 3:])
