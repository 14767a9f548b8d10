"""A diffusers DiT pipeline folder, saved by diffusers itself, through qandc: loading, the scheduler check, the VAE
and its scaling factor, and the DiTPipeline-like call."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import save_tiny_dit_pipeline
from PIL import Image

from qandc.cli import main
from qandc.errors import QandcError
from qandc.images import to_uint8
from qandc.model import load_checkpoint
from qandc.runtime import Pipeline, QandcDiTPipeline

diffusers = pytest.importorskip("diffusers")
SCALING = 0.5  # not the Stable Diffusion VAE's 0.18215: decoding must read it from the folder's VAE config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny DiTPipeline whose VAE's scaling factor is SCALING."""
    return save_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipeline", scaling_factor=SCALING)


def _direct_decode(folder, latents, scale):
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        return to_uint8(vae.decode(latents / scale).sample)


def test_call_returns_images_decoded_with_the_folders_vae_and_scale(folder):
    pipe = QandcDiTPipeline.from_pretrained(folder)
    out = pipe([1, 3], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(11))
    assert [image.size for image in out.images] == [(8, 8)] * 2  # 4x4 latents, one VAE upsampling
    latents = Pipeline.from_model(load_checkpoint(folder)).generate(torch.tensor([1, 3]), 11, 3, cfg_scale=2.0)
    expected = _direct_decode(folder, latents, SCALING)
    assert np.array_equal(np.stack([np.asarray(image) for image in out.images]), expected)
    assert not np.array_equal(expected, _direct_decode(folder, latents, 0.18215))  # the scale matters here


def test_generator_seed_keys_the_noise(folder):
    pipe = QandcDiTPipeline.from_pretrained(folder)
    first = pipe([0, 2], 2, generator=torch.Generator().manual_seed(5), output_type="np").images
    other = pipe([0, 2], 2, generator=torch.Generator().manual_seed(6), output_type="np").images
    assert first.shape == (2, 8, 8, 3) and 0 <= first.min() and first.max() <= 1
    assert not np.allclose(first, other)
    # sample i's noise is keyed by (seed, i): a call for the first label alone makes the same first image
    alone = pipe(0, 2, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert np.allclose(alone[0], first[0], atol=1e-5)  # batch size changes float rounding only
    with pytest.raises(QandcError, match="list of generators"):
        pipe([0, 1], 2, generator=[torch.Generator(), torch.Generator()])


def test_a_latent_model_without_vae_is_refused(folder):
    pipe = QandcDiTPipeline(Pipeline.from_model(load_checkpoint(folder)))
    with pytest.raises(QandcError, match="latent model needs a VAE"):
        pipe(0, 2)


def test_a_scheduler_on_another_schedule_is_refused(folder, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config_file = other / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "beta_schedule": "scaled_linear"}))
    with pytest.raises(QandcError, match="beta_schedule 'scaled_linear'"):
        load_checkpoint(other)


def test_generate_decodes_with_the_pipeline_folders_vae(folder, tmp_path):
    assert main(["generate", "--checkpoint", str(folder), "--labels", "0,4", "--steps", "2", "--out",
                 str(tmp_path / "g")]) == 0
    record = json.loads((tmp_path / "g" / "config.json").read_text())
    assert record["vae"] == os.path.relpath(folder / "vae", tmp_path / "g")  # relative to the samples, as manifests
    latents = torch.from_numpy(np.load(tmp_path / "g" / "samples.npz")["samples"])
    pipe = QandcDiTPipeline.from_pretrained(folder)
    images = pipe([0, 4], 2, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), _direct_decode(folder, latents, SCALING))
    assert Image.open(tmp_path / "g" / "grid.png").width >= 2 * 64
