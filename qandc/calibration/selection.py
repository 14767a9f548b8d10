"""Calibration sample selection: which `budget` entries of a pool of (x_t, t) samples to calibrate on.

Selectors (docs: method.md §4): `tap` (temporal-aware parallel clustering, Q&C), and the baselines `uniform`
(timestep-uniform, PTQ4DiT / Q-Diffusion style), `random` and `kmeans`. Every selector is deterministic for a seed.

TAP's merge of the m subsample clusterings is consensus clustering (method.md §4.4 default). Centroids and nearest-
centroid labels live in the feature space f = [sqrt(alpha) * x/||x||, sqrt(1-alpha) * (t/1000)/tau]: the squared
distance between two points of f is alpha * (2 - 2 cos) + (1 - alpha) * (dt/1000/tau)^2, so it is small exactly
where both terms of the affinity (cosine, and exp(-|dt|/1000/tau)) are large, weighted like them. The `kmeans`
baseline clusters the same space, so the two differ only in how the clusters are found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import pairwise_distances_argmin
from sklearn.preprocessing import OneHotEncoder, normalize

from ..artifacts import read_json
from ..chatter import quiet
from ..errors import QandcError

SELECTORS = ("tap", "uniform", "random", "kmeans")
TIMESTEP_SCALE = 1000.0  # t is the original diffusion timestep 0..999; the affinity uses t / 1000


@dataclass(frozen=True)
class SelectorParams:
    """Knobs of the selectors; defaults follow the paper (m=3, 1/20 subsamples, k=100, alpha=0.5, 25 steps)."""

    m: int = 3  # TAP: parallel subsamplings
    fraction: float = 0.05  # TAP: share of the pool in each subsampling (paper: 1/20)
    k: int = 100  # clusters (TAP and kmeans); reduced to what the pool size allows
    alpha: float = 0.5  # TAP: weight of spatial (cosine) affinity vs temporal affinity
    tau: float = 0.1  # TAP: temporal scale on t/1000
    timesteps: int = 25  # uniform: how many sampling steps (PTQ4DiT: 25 steps x 32 samples)

    def __post_init__(self):
        if self.m < 1 or self.k < 1 or self.timesteps < 1:
            raise QandcError(f"selector params: m, k and timesteps must be >= 1 (got {self.m}, {self.k}, "
                             f"{self.timesteps})")
        if not 0 < self.fraction <= 1:
            raise QandcError(f"selector params: fraction must be in (0, 1] (got {self.fraction})")
        if not 0 <= self.alpha <= 1:
            raise QandcError(f"selector params: alpha must be in [0, 1] (got {self.alpha})")
        if not self.tau > 0:
            raise QandcError(f"selector params: tau must be > 0 (got {self.tau})")

    def to_dict(self) -> dict:
        return asdict(self)


def select(selector: str, x: np.ndarray, t: np.ndarray, step: np.ndarray, budget: int, seed: int,
           params: SelectorParams = SelectorParams()) -> np.ndarray:
    """Indices (sorted, unique, int64) of `budget` pool entries. x: (N, D) float features (flattened x_t), t: (N,)
    original diffusion timesteps 0..999, step: (N,) sampling-step index of each entry. Deterministic for a seed."""
    if selector not in SELECTORS:
        raise QandcError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")
    x, t = _check_pool(x, t)
    step = np.asarray(step)
    if step.shape != t.shape:
        raise QandcError(f"step must have one entry per pool sample: shape {step.shape}, expected {t.shape}")
    n = len(x)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= n:
        raise QandcError(f"budget must be an integer in 1..{n} (the pool size), got {budget!r}")
    rng = np.random.default_rng(seed)
    if selector == "random":
        chosen = rng.choice(n, size=budget, replace=False)
    elif selector == "uniform":
        chosen = _timestep_uniform(step, budget, params.timesteps, rng)
    elif selector == "kmeans":
        k = max(1, min(params.k, n))
        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(_features(normalize(x), t, params))
        chosen = _round_robin(labels, budget, rng)
    else:
        chosen = _round_robin(tap_clusters(x, t, seed, params), budget, rng)
    return np.sort(chosen).astype(np.int64)


def read_selection(path, pool_size: int) -> dict:
    """A selection JSON whose 'indices' are entries of a pool of `pool_size`."""
    data = read_json(path)
    indices = data.get("indices")
    if not (isinstance(indices, list) and indices and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < pool_size for i in indices)):
        raise QandcError(f"{path}: 'indices' is not a non-empty list of pool entries 0..{pool_size - 1}")
    return data


def tap_clusters(x: np.ndarray, t: np.ndarray, seed: int, params: SelectorParams = SelectorParams()) -> np.ndarray:
    """TAP's final cluster label of every pool entry: m spectral clusterings of random subsamples, merged by
    consensus (each entry's nearest-centroid label in each clustering, one-hot, clustered again by k-means)."""
    x, t = _check_pool(x, t)
    n = len(x)
    rng = np.random.default_rng(seed)
    subsample_size = min(n, max(params.k, round(params.fraction * n)))
    k = max(1, min(params.k, subsample_size))
    unit_x = normalize(x)
    features = _features(unit_x, t, params)
    pool_labels = np.empty((n, params.m), dtype=np.int64)
    for j in range(params.m):
        members = rng.choice(n, size=subsample_size, replace=False)
        affinity = _affinity(unit_x[members], t[members], params)
        spectral = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=_draw_seed(rng))
        with quiet():  # scipy's dense eigensolver stands in on subsamples smaller than sklearn's sparse one wants
            labels = spectral.fit_predict(affinity)
        centroids = np.stack([features[members[labels == c]].mean(axis=0) for c in np.unique(labels)])
        pool_labels[:, j] = pairwise_distances_argmin(features, centroids)
    consensus = OneHotEncoder(dtype=np.float32).fit_transform(pool_labels)
    final_k = min(k, len(np.unique(pool_labels, axis=0)))
    return KMeans(n_clusters=final_k, n_init=1, random_state=_draw_seed(rng)).fit_predict(consensus)


def _check_pool(x, t) -> tuple[np.ndarray, np.ndarray]:
    x, t = np.asarray(x, dtype=np.float32), np.asarray(t, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise QandcError(f"x must be a non-empty (N, D) array of features, got shape {x.shape}")
    if t.shape != (len(x),):
        raise QandcError(f"t must have one timestep per pool sample: shape {t.shape}, expected ({len(x)},)")
    if not (np.isfinite(x).all() and np.isfinite(t).all()):
        raise QandcError("x and t must be finite (found NaN or inf)")
    return x, t


def _features(unit_x: np.ndarray, t: np.ndarray, params: SelectorParams) -> np.ndarray:
    """The space where TAP's centroids and the kmeans baseline live (module docstring: why this one)."""
    time = (t / TIMESTEP_SCALE / params.tau)[:, None]
    return np.hstack([np.sqrt(params.alpha) * unit_x, np.sqrt(1 - params.alpha) * time]).astype(np.float32)


def _affinity(unit_x: np.ndarray, t: np.ndarray, params: SelectorParams) -> np.ndarray:
    """A = alpha * max(cos, 0) + (1 - alpha) * exp(-|dt| / 1000 / tau) for rows of unit-norm features."""
    spatial = np.clip(unit_x.astype(np.float64) @ unit_x.T.astype(np.float64), 0.0, None)
    temporal = np.exp(-np.abs(t[:, None] - t[None, :]) / TIMESTEP_SCALE / params.tau)
    return params.alpha * spatial + (1 - params.alpha) * temporal


def _round_robin(labels: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform draws across clusters: turns over the clusters in a random order, one random untaken member per
    turn, skipping exhausted clusters, until `budget` entries (indices into `labels`) are taken."""
    shuffled = rng.permutation(len(labels))
    _, cluster = np.unique(labels[shuffled], return_inverse=True)
    by_cluster = np.argsort(cluster, kind="stable")  # grouped by cluster, random order inside each
    sorted_cluster, n_clusters = cluster[by_cluster], cluster.max() + 1
    rank = np.arange(len(labels)) - np.searchsorted(sorted_cluster, sorted_cluster)  # draw round of each entry
    turn = rng.permutation(n_clusters)[sorted_cluster]  # cluster's place within a round
    order = np.argsort(rank * n_clusters + turn, kind="stable")
    return shuffled[by_cluster[order[:budget]]]


def _timestep_uniform(step: np.ndarray, budget: int, timesteps: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced sampling steps, an equal share of the budget from each (remainder and shortfalls spread by
    round robin over the chosen steps), then random entries of other steps if the chosen ones run out."""
    distinct = np.unique(step)
    count = min(timesteps, len(distinct))
    chosen_steps = distinct[np.linspace(0, len(distinct) - 1, count).round().astype(np.int64)]
    in_chosen = np.flatnonzero(np.isin(step, chosen_steps))
    taken = in_chosen[_round_robin(step[in_chosen], min(budget, len(in_chosen)), rng)]
    others = np.setdiff1d(np.arange(len(step)), in_chosen)
    return np.concatenate([taken, rng.choice(others, size=budget - len(taken), replace=False)])


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))
