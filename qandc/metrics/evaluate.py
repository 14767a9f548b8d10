"""Reading samples in the forms qandc meets, and scoring them with the reference classifier."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..artifacts import read_json, relative_path, sha256_file
from ..errors import QandcError
from ..images import has_image_space, model_to_images, to_uint8
from ..model.dit import DiTConfig
from ..progress import progress
from ..readers import read_npz, regular_file
from .classifier import ASSETS, classify, load_classifier
from .scores import feature_stats, frechet_distance, frechet_interval, image_similarity

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
LABELED_NAME = re.compile(r"^(\d+)_")  # a PNG named like 3_00042.png has label 3
CHUNK = 4096  # samples turned into images at a time (bounds the memory of large sample sets)


def read_samples(path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 images (N, 28, 28), int labels (N,) or None, the kind of source) from a `qandc generate`
    directory, an .npz file with `images` and optional `labels`, or a folder of PNG files (labelled when every
    name starts with the label and '_')."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").exists():
        return (*_read_generated(path), "qandc generate directory")
    if path.is_dir():
        return (*_read_pngs(path), "PNG folder")
    if path.is_file() and path.suffix == ".npz":
        return (*_read_npz(path), "npz file")
    if path.exists():
        raise QandcError(f"{path}: not a qandc generate directory, an .npz file or a folder of PNG files")
    raise QandcError(f"{path}: no such file or directory")


def _read_generated(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    config_path, samples_path = path / "config.json", path / "samples.npz"
    config = read_json(config_path, "missing (qandc generate writes it beside samples.npz)")
    try:
        config = DiTConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise QandcError(f"{config_path}: no valid DiT config under 'model' ({type(e).__name__}: {e})") from None
    if not has_image_space(config):
        raise QandcError(f"{samples_path}: {config.in_channels}-channel latents, not images; eval needs image-space "
                         "samples")
    data = read_npz(samples_path, ".npz archive")
    samples = data.get("samples")
    if samples is None or samples.ndim != 4 or samples.shape[1] != config.in_channels:
        raise QandcError(f"{samples_path}: needs 'samples' of shape (N, {config.in_channels}, H, W) per config.json")
    if not len(samples):
        raise QandcError(f"{samples_path}: no samples")
    _check_finite(samples_path, samples)
    images = np.concatenate([to_uint8(model_to_images(torch.from_numpy(samples[i:i + CHUNK].astype(np.float32)),
                                                      config)) for i in range(0, len(samples), CHUNK)])
    if images.shape[-1] == 1:
        images = images[..., 0]
    return _checked(samples_path, images, data.get("labels"))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    data = read_npz(path, ".npz archive")
    if "images" not in data and "samples" in data:
        raise QandcError(f"{path}: a qandc generate samples.npz (model-space samples, read with the config.json "
                         f"beside them): pass its folder, {path.parent}")
    if "images" not in data:
        raise QandcError(f"{path}: no 'images' array (has: {', '.join(data) or 'nothing'})")
    images = data["images"]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    _check_shape(path, images)
    if np.issubdtype(images.dtype, np.floating):
        _check_finite(path, images)
        images = to_uint8(torch.from_numpy(images.astype(np.float32))[:, None])[..., 0]
    elif images.dtype != np.uint8:
        raise QandcError(f"{path}: images must be uint8, or float in [-1, 1]; got {images.dtype}")
    return _checked(path, images, data.get("labels"))


def _read_pngs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".png")
    if not files:
        raise QandcError(f"{path}: no samples.npz and no PNG files")
    images = []
    for file in progress(files, "reading PNGs"):
        images.append(_read_png(file))
    matches = [LABELED_NAME.match(f.name) for f in files]
    if any(matches) and not all(matches):
        unlabeled = files[[m is None for m in matches].index(True)].name
        raise QandcError(f"{path}: some PNG names start with a label (like 3_00042.png) and some do not ({unlabeled})")
    labels = np.array([int(m[1]) for m in matches]) if all(matches) else None
    return _checked(path, np.stack(images), labels)


def _read_png(file: Path) -> np.ndarray:
    """One 28x28 image as greyscale; its size is checked from the header, before any pixel is decoded."""
    try:
        with Image.open(regular_file(file)) as image:
            if image.size != IMAGE_SHAPE[::-1]:
                raise QandcError(f"{file}: {image.size[0]}x{image.size[1]} pixels, expected 28x28")
            return np.asarray(image.convert("L"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise QandcError(f"{file}: not a readable image ({type(e).__name__}: {str(e)[:160]})") from None


def _check_shape(path: Path, images: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise QandcError(f"{path}: images of shape {images.shape}, expected (N, 28, 28) single-channel")
    if not len(images):
        raise QandcError(f"{path}: no images")


def _check_finite(path: Path, values: np.ndarray) -> None:
    bad = int((~np.isfinite(values)).reshape(len(values), -1).any(1).sum())
    if bad:
        raise QandcError(f"{path}: {bad} of {len(values)} samples contain NaN or infinite values")


def _checked(path: Path, images: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray | None]:
    _check_shape(path, images)
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise QandcError(f"{path}: labels of shape {labels.shape} for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise QandcError(f"{path}: labels must be integers, got {labels.dtype}")
    out_of_range = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(out_of_range):
        raise QandcError(f"{path}: label {out_of_range[0]} is out of range 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def evaluate(samples_path, reference_path=None, classifier_assets=None, record_in=None) -> dict:
    """Score samples read from disk (see `read_samples`); see `score` for the metrics. The sources are recorded by
    kind and path, relative to the folder `record_in` (where the record is written) when given."""
    def source(kind: str, path) -> str:
        return f"{kind} {relative_path(path, record_in) if record_in else path}"

    images, labels, kind = read_samples(samples_path)
    reference = None
    if reference_path is not None:
        reference, _, reference_kind = read_samples(reference_path)
        if len(reference) != len(images):
            raise QandcError(f"{reference_path}: {len(reference)} reference images for {len(images)} samples")
    result = score(images, labels, reference, classifier_assets)
    result["samples"] = source(kind, samples_path)
    scored = _scored_file(Path(samples_path))
    result["samples_sha256"] = scored and sha256_file(scored)
    if reference is not None:
        result["reference"] = source(reference_kind, reference_path)
    return result


def _scored_file(path: Path) -> Path | None:
    """The file an evaluation of `path` scores: a generate folder's samples.npz, an .npz itself (None: PNGs)."""
    if path.is_dir():
        return path / "samples.npz" if (path / "samples.npz").is_file() else None
    return path


def stale_note(result: dict, samples_folder: Path) -> str | None:
    """What to say when the evaluation `result` scored other samples than `samples_folder`'s samples.npz holds now
    (a later generate into that folder), else None."""
    scored = result.get("samples_sha256") if isinstance(result, dict) else None
    now = samples_folder / "samples.npz"
    if isinstance(scored, str) and now.is_file() and sha256_file(now) != scored:
        return f"of other samples: {now} has changed since (qandc eval it again)"
    return None


FD_RELIABLE_FACTOR = 10  # FD is flagged unreliable below this many samples per feature dimension


def fd_validity(n: int, dim: int) -> tuple[bool, bool, str | None]:
    """(whether FD can be reported, whether it is reliable, the note that says why not) for n samples of
    dim-d features: below dim + 1 samples their covariance is singular (rank at most n - 1 < dim), so FD measures
    the sample size rather than the samples; below FD_RELIABLE_FACTOR * dim it is biased upward and noisy."""
    if n <= dim:
        return False, False, (f"FD not reported: {n} samples for {dim}-d features (their covariance has rank at most "
                              f"{n - 1} < {dim}; FD needs n > {dim}, and n >= {FD_RELIABLE_FACTOR * dim} to be "
                              "reliable)")
    if n < FD_RELIABLE_FACTOR * dim:
        return True, False, (f"FD unreliable: {n} samples for {dim}-d features (biased upward below "
                             f"{FD_RELIABLE_FACTOR} x {dim} = {FD_RELIABLE_FACTOR * dim}); compare only at equal n")
    return True, True, None


def score(images: np.ndarray, labels=None, reference: np.ndarray | None = None, classifier_assets=None,
          fd_resamples: int = 0) -> dict:
    """FD between the reference classifier's features of uint8 images (N, 28, 28) and its shipped test-set
    statistics, class accuracy when labels are given, and PSNR / SSIM / MSE against paired reference images.
    `fd` is None below feature dimension + 1 samples; `fd_reliable` and `fd_note` say whether and why not to trust
    it (see `fd_validity`). classifier_assets: a folder with the classifier files (None: the shipped qandc/assets).
    `fd_resamples` > 0 adds `fd_ci`, FD's 95% bootstrap interval over that many resamplings of the images."""
    model, stats = load_classifier(ASSETS if classifier_assets is None else classifier_assets)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features, predictions = classify(model.to(device), images)
    reported, reliable, note = fd_validity(len(images), features.shape[1])
    fd = frechet_distance(*feature_stats(features), stats["mu"], stats["sigma"]) if reported else None
    result = {"n": len(images), "fd": fd, "fd_reliable": reliable, "fd_note": note,
              "class_accuracy": None if labels is None else float((predictions == np.asarray(labels)).mean()),
              "classifier_sha256": stats["sha256"], "device": str(device)}
    if fd_resamples and reported:
        result["fd_ci"] = list(frechet_interval(features, stats["mu"], stats["sigma"], fd_resamples))
    if reference is not None:
        result.update(image_similarity(images, reference))
    return result


def fd_text(result: dict) -> str:
    """FD as the CLI prints it: the number, marked when unreliable, or why there is none."""
    if result["fd"] is None:
        return result["fd_note"]
    return f"FD {result['fd']:.3f}" + ("" if result["fd_reliable"] else f" ({result['fd_note']})")
