import pytest
import torch

from qandc.model import DiT, DiTConfig, initialize_weights


def tiny_config(**overrides) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, learn_sigma=True)
    return DiTConfig(**{**base, **overrides})


def tiny_model(seed=0, **overrides) -> DiT:
    """A tiny DiT with every weight random (no zero-init), so every path computes something non-trivial."""
    return initialize_weights(DiT(tiny_config(**overrides)), seed=seed, zero_init=False).eval()


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
