import json
import os
import subprocess
import sys

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


def save_tiny_dit_pipeline(path, num_classes=5, **vae_config):
    """A tiny DiTPipeline (random DiT, two-level VAE, DDIM scheduler) saved by diffusers itself to `path`."""
    import diffusers

    torch.manual_seed(3)
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                                  num_embeds_ada_norm=num_classes)
    with torch.no_grad():
        for p in transformer.parameters():  # diffusers zero-inits the output layers: make the samples vary
            p.add_(torch.randn_like(p) * 0.1)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, **vae_config)
    diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler()).save_pretrained(path)
    return path


def python_json(code: str, env: dict, lines: int = 1):
    """The JSON the last `lines` lines of a Python child running `code` (with `env` added) print: one object, or a
    list of `lines` (a child: what the code sets up — an interpreter mode, a cache folder — is its own)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()[-lines:]]
    return reports[0] if lines == 1 else reports


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
