import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qandc.cli import main
from qandc.data import images_to_model, load_fashion_mnist
from qandc.errors import QandcError
from qandc.metrics.classifier import STATS, WEIGHTS, FashionCNN, classify, uint8_to_input
from qandc.metrics.evaluate import evaluate, fd_validity, read_samples, score
from qandc.metrics.scores import PSNR_CAP, feature_stats, frechet_distance, frechet_interval, image_similarity
from qandc.model.dit import DiTConfig

FASHION_CONFIG = DiTConfig(input_size=16, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                           num_classes=10, pixel_shuffle=2, image_crop=28)


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """Blocky random uint8 images (N, 28, 28): 7x7 random values, each a 4x4 block."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (n, 7, 7)), np.ones((1, 4, 4))).astype(np.uint8)


def noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).round().astype(np.uint8)


def write_assets(folder, model: FashionCNN, features: np.ndarray):
    """A classifier assets folder like qandc/assets: weights plus float64 feature statistics."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    mu, sigma = feature_stats(features)
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, str(folder / STATS))
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(assets folder, model, images whose features made the statistics): a throwaway random-weight classifier,
    its batch-norm statistics set from the images so that features and predictions vary."""
    torch.manual_seed(0)
    model = FashionCNN()
    images = synthetic_images(300)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = those of the one batch below
    with torch.no_grad():
        model.train()(uint8_to_input(images))
    model.eval()
    features, _ = classify(model, images)
    return write_assets(tmp_path_factory.mktemp("assets"), model, features), model, images


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_generated(folder, images: np.ndarray, labels=None, config: DiTConfig = FASHION_CONFIG):
    """A directory like `qandc generate` writes: model-space samples.npz and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = images_to_model(torch.from_numpy(images)).numpy().astype(np.float32)
    np.savez(folder / "samples.npz", samples=samples, labels=np.arange(len(images)) % 10 if labels is None else labels)
    (folder / "config.json").write_text(json.dumps({"command": "generate", "model": config.to_dict()}))
    return folder


# --- scores -----------------------------------------------------------------------------------------------------

def diagonal_fd(mu1, s1, mu2, s2) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(diagonal_fd(mu1, s1, mu2, s2))
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(QandcError, match="shape"):
        frechet_distance(mu1, np.diag(s1), mu2[:8], np.diag(s2[:8]))


def test_frechet_interval_covers_the_distance_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    mu, sigma = np.full(4, 0.5), np.eye(4)
    true_fd = diagonal_fd(np.zeros(4), np.ones(4), mu, np.ones(4))
    widths = []
    for n in (200, 3200):
        features = rng.standard_normal((n, 4))
        low, high = frechet_interval(features, mu, sigma, resamples=100)
        assert low < frechet_distance(*feature_stats(features), mu, sigma) < high
        widths.append(high - low)
    assert low < true_fd < high  # at n = 3200 (the estimate's upward bias, about D / n, shifts small samples' interval)
    assert widths[1] < widths[0] / 2


def test_frechet_distance_adds_eps_when_the_square_root_is_not_finite(monkeypatch):
    from scipy import linalg

    sqrtm, calls = linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)

    monkeypatch.setattr(linalg, "sqrtm", failing_once)
    mu, s1, s2 = np.zeros(4), np.array([1.0, 0, 2, 0]), np.array([0, 3.0, 1, 0])
    eps = 1e-3
    assert frechet_distance(mu, np.diag(s1), mu, np.diag(s2), eps=eps) == pytest.approx(
        diagonal_fd(mu, s1 + eps, mu, s2 + eps) - 2 * 4 * eps)
    assert len(calls) == 2


def test_image_similarity_of_identical_images_is_perfect_and_drops_with_noise():
    images = synthetic_images(6)
    same = image_similarity(images, images.copy())
    assert same == {"psnr": PSNR_CAP, "ssim": 1.0, "mse": 0.0}
    light, heavy = noisy(images, 5), noisy(images, 40)
    scores = [image_similarity(x, images) for x in (light, heavy)]
    assert PSNR_CAP > scores[0]["psnr"] > scores[1]["psnr"] and 1 > scores[0]["ssim"] > scores[1]["ssim"]
    for x, similarity in zip((light, heavy), scores):
        per_image_mse = ((x.astype(np.float64) - images) ** 2).mean(axis=(1, 2))
        assert similarity["mse"] == pytest.approx(per_image_mse.mean())
        assert similarity["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / per_image_mse)))
    assert image_similarity(light[..., None], images[..., None]) == pytest.approx(scores[0])


def test_image_similarity_handles_colour_and_rejects_mismatched_shapes():
    rgb = np.stack([synthetic_images(3, seed) for seed in range(3)], axis=-1)
    assert image_similarity(rgb, rgb)["ssim"] == 1.0
    assert image_similarity(noisy(rgb, 20), rgb)["ssim"] < 1
    with pytest.raises(QandcError, match="one shape") as error:
        image_similarity(synthetic_images(3), synthetic_images(4))
    assert "\n" not in str(error.value)


# --- evaluate ---------------------------------------------------------------------------------------------------

def test_fd_against_its_own_statistics_is_zero_and_grows_with_noise(classifier, tmp_path):
    assets, _, images = classifier
    fds = [evaluate(write_npz(tmp_path / f"{sigma}.npz", images=noisy(images, sigma) if sigma else images),
                    classifier_assets=assets)["fd"] for sigma in (0, 10, 60)]
    assert abs(fds[0]) < 1e-6 * fds[1]
    assert 0 < fds[1] < fds[2]


def test_fd_is_withheld_below_feature_dimension_plus_one_and_flagged_below_ten_times_it(classifier):
    assets, _, images = classifier
    few, some = score(images[:128], classifier_assets=assets), score(images[:129], classifier_assets=assets)
    assert few["fd"] is None and not few["fd_reliable"] and "128-d" in few["fd_note"]
    assert np.isfinite(some["fd"]) and not some["fd_reliable"] and "unreliable" in some["fd_note"]
    assert "fd_ci" not in score(images[:20], classifier_assets=assets, fd_resamples=5)
    many = score(np.concatenate([images] + [noisy(images, 10, seed) for seed in range(4)])[:1280],
                 classifier_assets=assets)
    assert np.isfinite(many["fd"]) and many["fd_reliable"] and many["fd_note"] is None
    assert fd_validity(1279, 128)[:2] == (True, False) and fd_validity(1280, 128)[:2] == (True, True)


def test_class_accuracy_is_the_fraction_of_labels_the_classifier_agrees_with(classifier, tmp_path):
    assets, model, images = classifier
    _, predictions = classify(model, images)
    assert len(set(predictions.tolist())) > 3
    assert evaluate(write_npz(tmp_path / "a.npz", images=images, labels=predictions),
                    classifier_assets=assets)["class_accuracy"] == 1.0
    flipped = predictions.copy()
    flipped[:45] = (flipped[:45] + 1) % 10
    result = evaluate(write_npz(tmp_path / "b.npz", images=images, labels=flipped), classifier_assets=assets)
    assert result["class_accuracy"] == pytest.approx(1 - 45 / len(images))
    assert evaluate(write_npz(tmp_path / "c.npz", images=images), classifier_assets=assets)["class_accuracy"] is None


def test_evaluate_reports_similarity_to_a_reference(classifier, tmp_path):
    assets, _, images = classifier
    samples = write_npz(tmp_path / "s.npz", images=noisy(images[:20], 20))
    reference = write_npz(tmp_path / "r.npz", images=images[:20])
    result = evaluate(samples, reference, classifier_assets=assets)
    assert result["n"] == 20 and result["classifier_sha256"] and "s.npz" in result["samples"]
    expected = image_similarity(noisy(images[:20], 20), images[:20])
    assert {key: result[key] for key in expected} == pytest.approx(expected)
    assert "psnr" not in evaluate(samples, classifier_assets=assets)


def test_fd_ranks_real_images_closer_than_noisy_ones(classifier, tmp_path):
    try:
        test_images = load_fashion_mnist("test")[0].copy()
    except QandcError:
        pytest.skip("Fashion-MNIST is not installed")
    _, model, _ = classifier
    features, _ = classify(model, test_images[:500])
    assets = write_assets(tmp_path / "assets", model, features)
    held_out = test_images[500:1000]
    real = evaluate(write_npz(tmp_path / "real.npz", images=held_out), classifier_assets=assets)["fd"]
    fake = evaluate(write_npz(tmp_path / "fake.npz", images=noisy(held_out, 60)), classifier_assets=assets)["fd"]
    assert 0 < real < fake


# --- read_samples -----------------------------------------------------------------------------------------------

def test_read_samples_from_a_generate_directory(tmp_path):
    images = synthetic_images(5)
    folder = write_generated(tmp_path / "gen", images, labels=np.array([3, 1, 4, 1, 5]))
    read, labels, source = read_samples(folder)
    assert read.dtype == np.uint8 and np.array_equal(read, images)
    assert labels.tolist() == [3, 1, 4, 1, 5] and "generate" in source
    latent = write_generated(tmp_path / "latent", images, config=DiTConfig(input_size=16, patch_size=1))
    with pytest.raises(QandcError, match="latents"):
        read_samples(latent)


def test_large_generate_directories_are_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("qandc.metrics.evaluate.CHUNK", 2)  # 5 samples: chunks of 2, 2 and 1
    images = synthetic_images(5)
    read, labels, _ = read_samples(write_generated(tmp_path / "gen", images))
    assert np.array_equal(read, images) and labels.tolist() == [0, 1, 2, 3, 4]
    empty = write_generated(tmp_path / "empty", images)
    np.savez(empty / "samples.npz", samples=np.zeros((0, 4, 16, 16), np.float32), labels=np.zeros(0, int))
    with pytest.raises(QandcError, match="no samples"):
        read_samples(empty)


def test_read_samples_from_npz_files(tmp_path):
    images = synthetic_images(4)
    read, labels, source = read_samples(write_npz(tmp_path / "a.npz", images=images, labels=np.array([0, 9, 2, 2])))
    assert np.array_equal(read, images) and labels.tolist() == [0, 9, 2, 2] and "npz" in source
    read, labels, _ = read_samples(write_npz(tmp_path / "b.npz", images=images[..., None]))
    assert np.array_equal(read, images) and labels is None
    read, _, _ = read_samples(write_npz(tmp_path / "c.npz", images=images.astype(np.float32) / 127.5 - 1))
    assert np.array_equal(read, images)


def test_read_samples_from_png_folders(tmp_path):
    images = synthetic_images(3)
    for folder, names in (("labelled", ["7_00002.png", "0_00000.png", "3_00001.png"]),
                          ("plain", ["c.png", "a.png", "b.png"])):
        (tmp_path / folder).mkdir()
        for image, name in zip(images, names):
            Image.fromarray(image).save(tmp_path / folder / name)
        (tmp_path / folder / "notes.txt").write_text("other files are ignored")
    read, labels, source = read_samples(tmp_path / "labelled")
    assert np.array_equal(read, images[[1, 2, 0]]) and labels.tolist() == [0, 3, 7] and "PNG" in source
    read, labels, _ = read_samples(tmp_path / "plain")
    assert np.array_equal(read, images[[1, 2, 0]]) and labels is None
    Image.fromarray(images[0]).save(tmp_path / "plain" / "5_x.png")
    with pytest.raises(QandcError, match="some PNG names"):
        read_samples(tmp_path / "plain")


# --- CLI --------------------------------------------------------------------------------------------------------

def test_eval_command_writes_eval_json_and_prints_a_table(classifier, tmp_path, monkeypatch, capsys):
    assets, _, images = classifier
    monkeypatch.setattr("qandc.metrics.evaluate.ASSETS", assets)
    folder = write_generated(tmp_path / "gen", images[:30])
    reference = write_npz(tmp_path / "ref.npz", images=noisy(images[:30], 10))
    assert main(["eval", "--samples", str(folder), "--reference", str(reference)]) == 0
    record = json.loads((folder / "eval.json").read_text())
    assert record["command"] == "eval" and record["n"] == 30 and record["classifier_sha256"]
    assert {"fd", "class_accuracy", "samples", "reference", "psnr", "ssim", "mse"} <= set(record)
    assert {"scipy", "scikit-image", "torch"} <= set(record["versions"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "value"] and [row.split()[0] for row in table[1:7]] == [
        "n", "fd", "class_accuracy", "psnr", "ssim", "mse"]
    assert float(table[4].split()[1]) == pytest.approx(record["psnr"], abs=1e-4)
    assert main(["eval", "--samples", str(reference), "--out", str(tmp_path / "x" / "e.json")]) == 0
    assert json.loads((tmp_path / "x" / "e.json").read_text())["class_accuracy"] is None
    printed = capsys.readouterr().out
    assert "n/a" in printed and "FD not reported: 30 samples for 128-d features" in printed
    assert json.loads((tmp_path / "x" / "e.json").read_text())["fd"] is None
    assert main(["eval", "--samples", str(reference)]) == 0 and (tmp_path / "eval.json").exists()


def write_text(path):
    path.write_text("not samples")
    return path


BAD_INPUTS = {
    "missing": (lambda d: ["--samples", str(d / "nowhere")], "no such file or directory"),
    "no images": (lambda d: ["--samples", str(write_npz(d / "x.npz", pictures=synthetic_images(2)))],
                  "no 'images' array"),
    "label range": (lambda d: ["--samples", str(write_npz(d / "x.npz", images=synthetic_images(2), labels=[1, 10]))],
                    "label 10 is out of range"),
    "label count": (lambda d: ["--samples", str(write_npz(d / "x.npz", images=synthetic_images(2), labels=[1]))],
                    "labels of shape (1,) for 2 images"),
    "image size": (lambda d: ["--samples", str(write_npz(d / "x.npz", images=np.zeros((2, 32, 32), np.uint8)))],
                   "expected (N, 28, 28)"),
    "reference size": (lambda d: ["--samples", str(write_npz(d / "x.npz", images=synthetic_images(5))),
                                  "--reference", str(write_npz(d / "r.npz", images=synthetic_images(3)))],
                       "3 reference images for 5 samples"),
    "empty folder": (lambda d: ["--samples", str(d)], "no PNG files"),
    "not npz": (lambda d: ["--samples", str(write_text(d / "x.txt"))], "not a qandc generate directory"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    args = make_args(folder)
    with pytest.raises(QandcError, match=re.escape(message)):
        read_samples(args[1]) if case != "reference size" else evaluate(args[1], args[3])
    assert main(["eval", *args, "--out", str(tmp_path / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eval.json").exists()


def test_eval_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(option in out for option in ("--samples", "--reference", "--out"))
