"""Calibration sample selectors: contract, determinism, timestep-uniform coverage, TAP's clusters and balance."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from qandc.calibration.selection import SELECTORS, SelectorParams, select, tap_clusters
from qandc.errors import QandcError

GROUP_SIZES = (300, 30, 100, 60, 150, 200)  # group 0 is 10x group 1
GROUP_DIRECTION = (0, 1, 2, 0, 1, 2)
GROUP_FIRST_T = (0, 300, 600, 450, 750, 950)  # each direction at two timestep ranges >= 450 apart
# k = number of groups; subsamples of 40% keep ~12 of the smallest group (at 1/20 of this small pool, ~2)
GROUP_PARAMS = SelectorParams(k=len(GROUP_SIZES), fraction=0.4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These pools are tiny: OpenMP threads only add spin-waiting, which costs ~50x when the CPU is busy."""
    with threadpool_limits(1):
        yield


def grouped_pool(seed=0, dim=32, noise=0.1):
    """6 groups = 3 directions in x times 2 far-apart timestep ranges, each range 2 sampling steps 20 apart."""
    rng = np.random.default_rng(seed)
    directions = 5 * np.linalg.qr(rng.normal(size=(dim, 3)))[0].T
    x, t, group = [], [], []
    for g, size in enumerate(GROUP_SIZES):
        x.append(directions[GROUP_DIRECTION[g]] + noise * rng.normal(size=(size, dim)))
        t.append(GROUP_FIRST_T[g] + 20 * rng.integers(0, 2, size))
        group += [g] * size
    t = np.concatenate(t).astype(np.float64)
    return np.vstack(x).astype(np.float32), t, (999 - t) // 20, np.array(group)


def step_pool(steps=40, per_step=20, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    step = np.repeat(np.arange(steps), per_step)
    return rng.normal(size=(len(step), dim)).astype(np.float32), 999.0 - 25 * step, step


@pytest.mark.parametrize("selector", SELECTORS)
def test_contract_and_determinism(selector):
    x, t, step, _ = grouped_pool()
    chosen = select(selector, x, t, step, 60, seed=3, params=GROUP_PARAMS)
    assert chosen.dtype == np.int64 and len(chosen) == 60
    assert np.all(np.diff(chosen) > 0) and chosen[0] >= 0 and chosen[-1] < len(x)
    np.testing.assert_array_equal(chosen, select(selector, x, t, step, 60, seed=3, params=GROUP_PARAMS))
    if selector in ("random", "tap"):
        assert not np.array_equal(chosen, select(selector, x, t, step, 60, seed=4, params=GROUP_PARAMS))


@pytest.mark.filterwarnings("ignore:k >= N")  # TAP: k = pool size, so scipy solves the eigenproblem densely
@pytest.mark.parametrize("selector", SELECTORS)
def test_budget_equal_to_a_tiny_pool(selector):
    x, t, step = step_pool(steps=3, per_step=4)
    np.testing.assert_array_equal(select(selector, x, t, step, len(x), seed=0), np.arange(len(x)))


def test_uniform_covers_evenly_spaced_steps_equally():
    x, t, step = step_pool(steps=40, per_step=20)
    chosen = select("uniform", x, t, step, 25 * 4, seed=0)
    steps, counts = np.unique(step[chosen], return_counts=True)
    assert len(steps) == 25 and np.all(counts == 4)
    assert steps[0] == 0 and steps[-1] == 39 and set(np.diff(steps)) <= {1, 2}  # 39 / 24 = 1.625 apart on average


def test_uniform_spreads_remainder_and_fills_short_steps():
    x, t, step = step_pool(steps=5, per_step=10)
    chosen = select("uniform", x, t, step, 12, seed=0, params=SelectorParams(timesteps=5))
    assert sorted(np.bincount(step[chosen])) == [2, 2, 2, 3, 3]
    keep = (step != 2) | (np.arange(len(step)) % 10 == 0)  # step 2 keeps a single entry
    x, t, step = x[keep], t[keep], step[keep]
    chosen = select("uniform", x, t, step, 20, seed=0, params=SelectorParams(timesteps=5))
    assert sorted(np.bincount(step[chosen])) == [1, 4, 5, 5, 5]
    chosen = select("uniform", x, t, step, 25, seed=0, params=SelectorParams(timesteps=3))  # steps 0, 2, 4: 21
    assert len(chosen) == 25 and np.bincount(step[chosen], minlength=5)[[0, 2, 4]].tolist() == [10, 1, 10]


def test_tap_recovers_groups_only_with_the_temporal_term():
    x, t, _, group = grouped_pool()
    for seed in range(3):
        assert adjusted_rand_score(group, tap_clusters(x, t, seed, GROUP_PARAMS)) > 0.9
    spatial_only = SelectorParams(k=len(GROUP_SIZES), fraction=0.4, alpha=1.0)
    assert adjusted_rand_score(group, tap_clusters(x, t, 0, spatial_only)) < 0.7  # same-direction groups merge


@pytest.mark.parametrize("selector", ["tap", "kmeans"])
def test_cluster_selectors_draw_equally_from_unequal_groups(selector):
    x, t, step, group = grouped_pool()
    per_group = np.bincount(group[select(selector, x, t, step, 60, seed=0, params=GROUP_PARAMS)], minlength=6)
    assert per_group.min() >= 8 and per_group.max() <= 12, per_group
    by_chance = np.bincount(group[select("random", x, t, step, 60, seed=0)], minlength=6)
    assert by_chance.max() >= 3 * by_chance.min(), by_chance  # what the balance is measured against


@pytest.mark.filterwarnings("ignore:k >= N")
def test_k_is_reduced_to_the_pool():
    x, t, step, _ = grouped_pool()
    labels = tap_clusters(x[:50], t[:50], 0, SelectorParams(k=100))  # subsamples: the whole pool, k -> 50
    assert len(np.unique(labels)) == 50
    assert len(select("kmeans", x[:50], t[:50], step[:50], 50, seed=0, params=SelectorParams(k=100))) == 50


@pytest.mark.parametrize("change, message", [
    (dict(selector="greedy"), "tap, uniform, random, kmeans"),
    (dict(budget=0), "budget"),
    (dict(budget=11), "budget"),
    (dict(budget=2.5), "budget"),
    (dict(x=np.zeros(10)), "x must be"),
    (dict(t=np.zeros(9)), "t must"),
    (dict(step=np.zeros(11)), "step must"),
    (dict(x=np.full((10, 4), np.nan)), "finite"),
])
def test_bad_inputs(change, message):
    x, t, step = step_pool(steps=2, per_step=5, dim=4)
    args = dict(selector="tap", x=x, t=t, step=step, budget=5, seed=0) | change
    with pytest.raises(QandcError, match=message):
        select(**args)


@pytest.mark.parametrize("params", [dict(m=0), dict(k=0), dict(timesteps=0), dict(fraction=0.0), dict(fraction=1.5),
                                    dict(alpha=-0.1), dict(alpha=1.1), dict(tau=0.0)])
def test_bad_params(params):
    with pytest.raises(QandcError, match="selector params"):
        SelectorParams(**params)


def test_params_round_trip():
    params = SelectorParams(k=7, tau=0.2)
    assert SelectorParams(**params.to_dict()) == params


def test_small_subsamples_keep_sklearns_eigensolver_note_to_verbose_runs():
    import warnings

    from qandc import chatter

    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(24, 16)).astype(np.float32), np.repeat(np.arange(6), 4)
    seen = {}
    for verbose in (False, True):
        chatter.show(verbose)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tap_clusters(x, t, 0)
        finally:
            chatter.show(False)
        seen[verbose] = [w for w in caught if "square matrix" in str(w.message)]
    assert not seen[False] and seen[True]
