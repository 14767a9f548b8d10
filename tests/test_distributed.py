"""Sharded generation and pool collection under torchrun (gloo, 2 CPU processes): the same bits as one process,
reruns that skip finished shards, eval of the merged output (the engine scaling benchmark: test_scale.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.cli import main
from qandc.distributed import init
from qandc.errors import QandcError
from qandc.model import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
GENERATE = ["--num-images", "10", "--batch-size", "3", "--steps", "4", "--cache", "interval=2", "--seed", "5"]
CALIBRATE = ["--preset", "w8a8-int8", "--selector", "tap", "--cache", "interval=2", "--samples", "24",
             "--pool-samples", "6", "--steps", "6", "--clusters", "6", "--vc-samples", "4", "--batch-size", "2"]


def qandc(*args, procs: int = 0) -> subprocess.CompletedProcess:
    """`python -m qandc ARGS` (procs=0) or `torchrun --standalone --nproc-per-node PROCS -m qandc ARGS`."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"] if procs else ["-m"]
    result = subprocess.run([sys.executable, *launcher, "qandc", *map(str, args)], capture_output=True, text=True,
                            env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DiT whose samples are 28x28 images, like the reference model's (so eval can score them)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(tiny_model(input_size=16, pixel_shuffle=2, image_crop=28, guidance="all"), path)
    return path


def test_generate_under_torchrun_is_bitwise_one_process_and_reruns_only_missing_shards(checkpoint, tmp_path):
    qandc("generate", "--checkpoint", checkpoint, *GENERATE, "--out", tmp_path / "k1")
    qandc("generate", "--checkpoint", checkpoint, *GENERATE, "--out", tmp_path / "k2", procs=2)
    one, two = (np.load(tmp_path / k / "samples.npz") for k in ("k1", "k2"))
    assert two["samples"].shape == (10, 4, 16, 16) and two["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert np.array_equal(one["samples"], two["samples"]) and np.array_equal(one["labels"], two["labels"])
    # noise is keyed by the global sample id: one shard of all 10 samples gives the same images (up to batching)
    assert main(["generate", "--checkpoint", str(checkpoint), *GENERATE, "--batch-size", "10",
                 "--out", str(tmp_path / "whole")]) == 0
    whole = np.load(tmp_path / "whole" / "samples.npz")["samples"]
    assert np.allclose(whole, two["samples"], rtol=1e-4, atol=1e-4 * np.abs(whole).max())
    config = json.loads((tmp_path / "k2" / "config.json").read_text())
    assert config["world_size"] == 2 and config["shards"]["count"] == 4 and (tmp_path / "k2" / "grid.png").exists()

    shards = sorted((tmp_path / "k2" / "shards").glob("shard-*.npz"))
    assert len(shards) == 4
    shards[2].unlink()
    before = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    result = qandc("generate", "--checkpoint", checkpoint, *GENERATE, "--out", tmp_path / "k2", procs=2)
    assert {p: p.stat().st_mtime_ns for p in before} == before and shards[2].exists()
    assert "rank 0/2 shards: 1 computed, 1 kept" in result.stderr
    assert "rank 1/2 shards: 0 computed, 2 kept" in result.stderr
    assert np.array_equal(np.load(tmp_path / "k2" / "samples.npz")["samples"], one["samples"])

    qandc("eval", "--samples", tmp_path / "k2")
    scores = json.loads((tmp_path / "k2" / "eval.json").read_text())
    assert scores["n"] == 10 and scores["fd"] is None and scores["class_accuracy"] is not None  # n <= 128: no FD


def test_shards_made_with_other_settings_are_recomputed(checkpoint, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--labels", "1,2", "--num-images", "4", "--steps", "2",
            "--batch-size", "2"]
    assert main([*args, "--seed", "0", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "a")]) == 0  # same folder, other seed
    assert "shards: 2 computed, 0 kept" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / k / "samples.npz") for k in "ab")
    assert np.array_equal(a["samples"], b["samples"]) and a["labels"].tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("args,message", [
    (["--num-images", "4", "--per-class", "2"], "exclude each other"),
    (["--num-images", "0"], "--num-images must be positive"),
    (["--labels", "3,11", "--num-images", "4"], "label 11 is out of range"),
])
def test_bad_num_images_gives_one_line(checkpoint, tmp_path, capsys, args, message):
    assert main(["generate", "--checkpoint", str(checkpoint), *args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def recipe(checkpoint, tmp_path_factory):
    """A recipe calibrated by one process."""
    pytest.importorskip("modelopt.torch.quantization")
    out = tmp_path_factory.mktemp("recipe")
    qandc("calibrate", "--checkpoint", checkpoint, *CALIBRATE, "--out", out)
    return out


def test_calibrate_under_torchrun_gives_the_same_pool_and_recipe(checkpoint, recipe, tmp_path):
    qandc("calibrate", "--checkpoint", checkpoint, *CALIBRATE, "--out", tmp_path, procs=2)
    assert not (tmp_path / "pool-shards").exists()  # merged into pool.npz
    one, two = np.load(recipe / "pool.npz"), np.load(tmp_path / "pool.npz")
    assert len(two["x"]) == 6 * 6 and all(np.array_equal(one[k], two[k]) for k in one.files)
    for name in ("pool.json", "selection-tap.json", "recipe.json", "amax.safetensors", "vc.safetensors"):
        assert (recipe / name).read_bytes() == (tmp_path / name).read_bytes(), name


@pytest.mark.parametrize("device,message", [("cuda:1", "each process takes cuda:LOCAL_RANK"),
                                            ("meta", "support cuda and cpu")])
def test_torchrun_device_errors_are_one_line(monkeypatch, device, message):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(QandcError, match=message):
        init(torch.device(device))
