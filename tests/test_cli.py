import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qandc.artifacts import sha256_file
from qandc.cli import main
from qandc.sampling import CachePlan


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "rgb.pt"
    assert main(["init", "--config", "DiT-S/8", "--input-size", "16", "--in-channels", "3", "--num-classes", "5",
                 "--nonzero", "--out", str(path)]) == 0
    return path


def test_generate_writes_samples_grid_and_config(checkpoint, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(checkpoint), "--labels", "0,1,4", "--steps", "6",
                 "--cache", "interval=2,branches=mlp", "--seed", "3", "--batch-size", "2", "--out", str(out)]) == 0
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (3, 3, 16, 16) and data["samples"].dtype == np.float32
    assert data["labels"].tolist() == [0, 1, 4]
    config = json.loads((out / "config.json").read_text())
    grid = Image.open(out / "grid.png")  # 3 samples of 16x16 px in a 2x2 grid, each shown at 64 px under a caption
    assert grid.width == 2 * 64 and grid.height > 2 * 64 and grid.text["Description"] == config["caption"]
    assert config["caption"] == (f"{CachePlan.parse('interval=2,branches=mlp').describe()} · float · ddpm 6 steps · "
                                 "CFG 1.5 · seed 3")
    assert config["checkpoint_sha256"] == sha256_file(checkpoint)
    assert config["plan"]["branches"] == "mlp" and config["seed"] == 3 and config["guidance"] == "first3"
    assert "torch" in config["versions"]
    # batching does not change a sample: noise is keyed by (seed, index)
    assert main(["generate", "--checkpoint", str(checkpoint), "--labels", "0,1,4", "--steps", "6",
                 "--cache", "interval=2,branches=mlp", "--seed", "3", "--out", str(tmp_path / "one")]) == 0
    again = np.load(tmp_path / "one" / "samples.npz")["samples"]
    assert np.allclose(again, data["samples"], rtol=1e-4, atol=1e-4 * np.abs(again).max())


def test_latent_models_save_latents_without_a_grid(tmp_path, capsys):
    ckpt = tmp_path / "latent.pt"
    main(["init", "--config", "DiT-S/8", "--input-size", "16", "--num-classes", "3", "--out", str(ckpt)])
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "1", "--steps", "2", "--out",
                 str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "samples.npz").exists() and not (tmp_path / "g" / "grid.png").exists()
    assert "--vae" in capsys.readouterr().err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qandc", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt"], "no such file"),
    (["--labels", "5"], "label 5 is out of range"),
    (["--cache", "interval=0"], "interval"),
    (["--cache", "interval=2,branches=blocks.99.mlp"], "blocks.99.mlp"),
    (["--steps", "0"], "steps must be"),
    (["--sampler", "euler"], "invalid choice"),
])
def test_bad_input_gives_one_line_and_exit_2(checkpoint, tmp_path, args, message):
    base = {"--checkpoint": str(checkpoint), "--out": str(tmp_path / "o")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = _run("generate", *[v for kv in base.items() for v in kv])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_debug_shows_the_traceback(tmp_path):
    result = _run("--debug", "generate", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_explains_every_command():
    for command in ([], ["generate"], ["init"]):
        result = _run(*command, "--help")
        assert result.returncode == 0 and "usage: qandc" in result.stdout
    assert "--cache" in _run("generate", "--help").stdout


def test_latents_decode_through_a_local_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "latent.pt"
    main(["init", "--config", "DiT-S/8", "--input-size", "16", "--num-classes", "3", "--nonzero", "--out", str(ckpt)])
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "0,2", "--steps", "2", "--vae",
                 str(tmp_path / "vae"), "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "grid.png").width == 2 * 64  # two decoded 16x16 samples at 64 px each
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "0", "--steps", "2", "--vae",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "h")]) == 2


def test_non_finite_samples_are_an_error_not_a_black_image(tmp_path, capsys):
    """A model that overflows (here: one infinite weight) must not leave NaN images behind silently."""
    import torch

    from conftest import tiny_model
    from qandc.model import save_checkpoint

    model = tiny_model(in_channels=1, learn_sigma=False)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = float("inf")
    save_checkpoint(model, tmp_path / "inf.pt", {})
    assert main(["generate", "--checkpoint", str(tmp_path / "inf.pt"), "--labels", "1,2", "--steps", "4",
                 "--out", str(tmp_path / "out")]) == 2
    assert "are not finite (NaN / Inf)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "samples.npz").exists()
