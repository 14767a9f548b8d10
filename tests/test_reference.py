"""The Fashion-MNIST data loader, resumable training, and the shipped reference model and classifier."""

import gzip
import json

import numpy as np
import pytest
import torch

from qandc.artifacts import ASSETS
from qandc.data import images_to_model, load_fashion_mnist
from qandc.errors import QandcError
from qandc.images import model_to_images, to_uint8
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.sampling import sample


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28))
    labels = np.arange(64) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_idx_loader_reads_what_was_written(tiny_dataset):
    folder, images, labels = tiny_dataset
    got_images, got_labels = load_fashion_mnist("test", folder)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_missing_or_broken_data_gives_one_line(tmp_path, tiny_dataset):
    with pytest.raises(QandcError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    folder, *_ = tiny_dataset
    raw = gzip.open(folder / "train-images-idx3-ubyte.gz").read()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(QandcError, match="truncated"):
        load_fashion_mnist("train", folder)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(QandcError, match="not an IDX"):
        load_fashion_mnist("train", folder)
    _write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((64, 32, 32), np.uint8))
    with pytest.raises(QandcError, match="images are 32x32, not Fashion-MNIST's 28x28"):
        load_fashion_mnist("train", folder)
    _write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((64, 28, 28), np.uint8))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(64) % 11)
    with pytest.raises(QandcError, match="has label 10; Fashion-MNIST's run from 0 to 9"):
        load_fashion_mnist("train", folder)


def test_model_space_round_trips_to_images():
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    x = images_to_model(images)
    assert x.shape == (3, 4, 16, 16)
    config = load_checkpoint(REFERENCE_CHECKPOINT).config
    assert np.array_equal(to_uint8(model_to_images(x, config))[..., 0], images.numpy())


def _train(out, steps, data_dir, *more):
    from qandc.cli import main
    assert main(["train", "--out", str(out), "--steps", str(steps), "--hidden", "32", "--depth", "2", "--heads", "2",
                 "--batch-size", "8", "--log-every", "1", "--data-dir", str(data_dir), "--device", "cpu", *more]) == 0


def test_training_resumes_exactly(tmp_path, tiny_dataset):
    folder, *_ = tiny_dataset
    _train(tmp_path / "straight", 4, folder)
    _train(tmp_path / "chunked", 2, folder)
    _train(tmp_path / "chunked", 4, folder, "--export", str(tmp_path / "chunked" / "ema.pt"))  # resumes at step 2
    a, b = (torch.load(p / "train.pt", weights_only=True) for p in (tmp_path / "straight", tmp_path / "chunked"))
    assert a["step"] == b["step"] == 4
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert (tmp_path / "chunked" / "grid.png").exists()
    log = (tmp_path / "chunked" / "log.txt").read_text()
    assert "resumed at step 2" in log
    typed = "qandc train --out $OUT --steps 4 --hidden 32 --depth 2 --heads 2 --batch-size 8 --log-every 1 --data-dir"
    assert f"command: {typed} <elsewhere>/{folder.name} --device cpu --export $OUT/ema.pt" in log  # rerunnable
    sidecar = json.loads((tmp_path / "chunked" / "ema.json").read_text())
    assert sidecar["training"]["command"].startswith(typed) and sidecar["training"]["steps"] == 4


def test_shipped_reference_model():
    model = load_checkpoint(REFERENCE_CHECKPOINT)
    c = model.config
    assert (c.guidance, c.in_channels, c.input_size, c.patch_size, c.num_classes) == ("all", 4, 16, 1, 10)
    assert (c.input_size // c.patch_size) ** 2 == 256  # tokens per image, as DiT-XL/2 at 256x256
    assert REFERENCE_CHECKPOINT.stat().st_size <= 20e6
    assert next(model.parameters()).dtype == torch.float32


def test_shipped_model_draws_the_asked_classes():
    """Ten samples, one per class, must mostly be recognised by the shipped classifier (it is trained: a random
    model scores about 0.1)."""
    model = load_checkpoint(REFERENCE_CHECKPOINT)
    labels = torch.arange(10)
    samples = sample(model, labels, 20, "ddim", cfg_scale=1.5, seed=0)
    result = score(to_uint8(model_to_images(samples, model.config))[..., 0], labels.numpy())
    assert result["class_accuracy"] >= 0.8


def test_shipped_classifier_and_statistics():
    from qandc.metrics.classifier import load_classifier
    model, stats = load_classifier()
    assert stats["mu"].shape == (128,) and stats["sigma"].shape == (128, 128)
    assert np.allclose(stats["sigma"], stats["sigma"].T) and (np.linalg.eigvalsh(stats["sigma"]) > -1e-6).all()
    assert sum(f.stat().st_size for f in ASSETS.glob("classifier*")) < 3e6
    try:
        images, labels = load_fashion_mnist("test")
    except QandcError:
        pytest.skip("Fashion-MNIST is not installed")
    result = score(images[:1000], labels[:1000])
    assert result["class_accuracy"] >= 0.92  # the classifier's own test accuracy
    assert result["fd"] < 1.0  # real test images sit on the shipped statistics
