"""Turning model outputs into images: pixel-space samples directly, latents through a local diffusers VAE."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .artifacts import atomic_path
from .errors import QandcError
from .requires import require

IMAGE_CHANNELS = (1, 3)


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


def to_pil(image: np.ndarray) -> Image.Image:
    """One (H, W, C) uint8 image as a PIL image: greyscale ("L") for one channel, RGB for three."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def load_vae(vae_dir: str | Path, device: torch.device | str = "cpu"):
    """A local diffusers AutoencoderKL directory, in eval mode on `device` (diffusers is optional)."""
    AutoencoderKL = require("diffusers", "--vae").AutoencoderKL
    check_vae_folder(vae_dir)
    try:  # low_cpu_mem_usage off: without accelerate diffusers turns it off itself, with a notice on stderr
        return AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True,
                                             low_cpu_mem_usage=False).to(device).eval()
    except (OSError, ValueError) as e:
        raise QandcError(f"{vae_dir}: not a local diffusers AutoencoderKL ({str(e).splitlines()[0][:160]})") from None


def check_vae_folder(vae_dir: str | Path) -> None:
    """One line unless `vae_dir` holds a config.json (checked before diffusers, whose message speaks of the Hub, and
    before anything slow is loaded beside it)."""
    if not (Path(vae_dir) / "config.json").is_file():
        raise QandcError(f"{vae_dir}: not a local diffusers AutoencoderKL (no config.json there)")


def decode_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """DiT latents -> images in [-1, 1] through a diffusers AutoencoderKL (a loaded one or its directory), divided by
    the VAE config's `scaling_factor` first, as diffusers' DiTPipeline does."""
    if isinstance(vae, (str, Path)):
        vae = load_vae(vae, latents.device)
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor).sample


GRID_TILE = 64  # grid.png shows each sample at least this many pixels a side (NEAREST upscaling)
CAPTION_SEPARATOR = " · "


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None,
              captions: list[str] | None = None, title: str = "") -> None:
    """Tile (N, H, W, C) uint8 images into one PNG, atomically, each upscaled (NEAREST) to at least GRID_TILE
    pixels a side; `captions` label the rows in a left margin, `title` (parts joined by CAPTION_SEPARATOR, wrapped
    between parts) is drawn above the grid and kept in the PNG's "Description" text."""
    scale = math.ceil(GRID_TILE / min(images.shape[1:3]))
    n, h, w, c = images.shape
    h, w = h * scale, w * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image.repeat(scale, 0).repeat(scale, 1)
    picture = to_pil(grid)
    font = ImageFont.load_default(size=12)
    white = 255 if c == 1 else (255, 255, 255)
    measure = ImageDraw.Draw(picture).textlength
    if captions:
        margin = 8 + max(int(measure(text, font=font)) for text in captions)
        picture = _extend(picture, left=margin)
        draw = ImageDraw.Draw(picture)
        for r, text in enumerate(captions[:rows]):
            draw.text((4, r * h + h // 2), text, fill=white, font=font, anchor="lm")
    info = PngInfo()
    if title:
        lines = _wrap(title.split(CAPTION_SEPARATOR), picture.width - 8, lambda text: measure(text, font=font))
        width = max(picture.width, 8 + max(int(measure(line, font=font)) for line in lines))
        picture = _extend(picture, top=4 + 16 * len(lines), right=width - picture.width)
        draw = ImageDraw.Draw(picture)
        for i, line in enumerate(lines):
            draw.text((4, 4 + 16 * i), line, fill=white, font=font)
        info.add_text("Description", title)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)


def _extend(picture: Image.Image, left: int = 0, top: int = 0, right: int = 0) -> Image.Image:
    """`picture` on a black canvas with that many more pixels on the left, top and right."""
    canvas = Image.new(picture.mode, (picture.width + left + right, picture.height + top))
    canvas.paste(picture, (left, top))
    return canvas


def _wrap(parts: list[str], width: float, length) -> list[str]:
    """`parts` joined by CAPTION_SEPARATOR into lines no longer than `width` where they fit (`length` measures)."""
    lines = [parts[0]]
    for part in parts[1:]:
        joined = lines[-1] + CAPTION_SEPARATOR + part
        if length(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines
