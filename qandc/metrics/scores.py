"""The scores: Fréchet distance between feature Gaussians, and PSNR / SSIM / MSE between paired images."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from ..errors import QandcError

PSNR_CAP = 100.0  # dB; identical images have infinite PSNR


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as the standard FID code computes it: scipy's
    singular-matrix warning is silenced (that code's `disp=False`), and if the square root of sigma1 @ sigma2 is
    not finite, eps * I is added to both covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise QandcError(f"feature statistics disagree in shape: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (N, D), N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise QandcError(f"feature statistics need at least 2 feature vectors (N, D), got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_interval(features: np.ndarray, mu, sigma, resamples: int = 200, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval (scipy.stats.bootstrap, `resamples` resamplings of the feature vectors) of the
    Fréchet distance between the Gaussian of `features` (N, D) and N(mu, sigma)."""
    from scipy.stats import bootstrap

    features = np.asarray(features, np.float64)
    result = bootstrap((np.arange(len(features)),),
                       lambda rows: frechet_distance(*feature_stats(features[rows.astype(np.int64)]), mu, sigma),
                       n_resamples=resamples, confidence_level=level, method="percentile", vectorized=False,
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def image_similarity(images: np.ndarray, reference: np.ndarray) -> dict:
    """Mean per-image PSNR (dB, each capped at PSNR_CAP = 100 since identical images give infinity) and SSIM, and
    MSE on the [0, 255] scale, of uint8 images (N, H, W) or (N, H, W, C) against reference images of that shape."""
    images, reference = np.asarray(images), np.asarray(reference)
    uint8 = images.dtype == reference.dtype == np.uint8
    if images.shape != reference.shape or images.ndim not in (3, 4) or not uint8 or not len(images):
        raise QandcError(f"image similarity needs non-empty uint8 images (N, H, W[, C]) of one shape: got "
                         f"{images.dtype} {images.shape} against reference {reference.dtype} {reference.shape}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images, reference = images[..., 0], reference[..., 0]
    channel_axis = -1 if images.ndim == 4 else None
    psnr, ssim = [], []
    for image, ref in zip(images, reference):
        with np.errstate(divide="ignore"):
            psnr.append(min(peak_signal_noise_ratio(ref, image, data_range=255), PSNR_CAP))
        try:
            ssim.append(structural_similarity(ref, image, data_range=255, channel_axis=channel_axis))
        except ValueError as e:
            raise QandcError(f"SSIM of {image.shape} images: {e}") from None
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "mse": float(mean_squared_error(reference, images))}
