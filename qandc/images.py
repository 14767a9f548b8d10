"""Turning model outputs into images: pixel-space samples directly, latents through a local diffusers VAE."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .artifacts import atomic_path
from .errors import QandcError
from .requires import require

IMAGE_CHANNELS = (1, 3)
LATENT_SCALE = 0.18215  # the Stable Diffusion VAE's latent scale, as DiT uses it


def model_to_images(samples: torch.Tensor, config) -> torch.Tensor:
    """Model-space samples -> images in [-1, 1] (N, C, H, W), per the config's pixel_shuffle and image_crop."""
    images = F.pixel_shuffle(samples, config.pixel_shuffle) if config.pixel_shuffle > 1 else samples
    if config.image_crop:
        top = (images.shape[-1] - config.image_crop) // 2
        images = images[..., top:top + config.image_crop, top:top + config.image_crop]
    return images


def has_image_space(config) -> bool:
    """Whether samples become images without a VAE."""
    return config.in_channels // config.pixel_shuffle ** 2 in IMAGE_CHANNELS


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def decode_latents(latents: torch.Tensor, vae_dir: str | Path) -> torch.Tensor:
    """Decode DiT latents with a local diffusers AutoencoderKL directory (diffusers is optional)."""
    AutoencoderKL = require("diffusers", "--vae").AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(latents.device).eval()
    except (OSError, ValueError) as e:
        raise QandcError(f"{vae_dir}: not a local diffusers AutoencoderKL ({str(e).splitlines()[0][:160]})") from None
    with torch.no_grad():
        return vae.decode(latents / LATENT_SCALE).sample


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None,
              captions: list[str] | None = None) -> None:
    """Tile (N, H, W, C) uint8 images into one PNG, atomically; `captions` label the rows in a left margin."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    if captions:
        font = ImageFont.load_default()
        margin = 8 + max(int(ImageDraw.Draw(picture).textlength(text, font=font)) for text in captions)
        captioned = Image.new(picture.mode, (picture.width + margin, picture.height))
        captioned.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(captioned)
        for r, text in enumerate(captions[:rows]):
            draw.text((4, r * h + h // 2), text, fill=255 if c == 1 else (255, 255, 255), font=font, anchor="lm")
        picture = captioned
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
