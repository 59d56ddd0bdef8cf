"""Image decoding and the public resize-then-crop to the top resolution."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


class CorruptImage(Exception):
    """An image (or frame) that cannot be decoded; the dataset skips and counts it."""


def decode_image(data: Union[bytes, str]) -> Image.Image:
    """RGB PIL image from encoded bytes or a path; CorruptImage when it cannot be decoded. 16-bit grey
    samples keep their high byte, as the public decoder (stb_image) does (PIL would clip them at 255)."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        img.load()
        if img.mode.startswith("I;16"):
            img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise CorruptImage(str(e)) from e


def resize_crop(img: Image.Image, image_size: int, random_crop: bool = False,
                rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The public reader's resize and crop: the smaller side scaled to ``image_size`` with a triangle
    (bilinear) filter, widened when shrinking (mlx.data resizes with stb_image_resize's triangle filter;
    results may differ from it by rounding, and at the borders), the other side rounded half up; then a
    centre (or uniformly random) ``image_size`` square.

    Returns uint8 (H, W, 3). ``image_size <= 0`` keeps the image as it is.
    """
    if image_size <= 0:
        return np.asarray(img, dtype=np.uint8)
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = (max(image_size, math.floor(scale * s + 0.5)) for s in (w, h))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    if random_crop:
        rng = rng or np.random.default_rng()
        left, top = int(rng.integers(0, nw - image_size + 1)), int(rng.integers(0, nh - image_size + 1))
    else:
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
    return np.asarray(img.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def to_model_range(images_u8) -> "torch.Tensor":
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1] the public way: (x - 127) / 128."""
    import torch

    x = torch.as_tensor(images_u8)
    return ((x.float() - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()


def tile_frames(frames: np.ndarray) -> np.ndarray:
    """(n*n, H, W, C) frames -> (n*H, n*W, C): frame ``i*n + j`` at grid row i, column j.

    This is the layout of the temporal mode (``b c (n h) (m w) -> b (n m) c h w`` in the public code).
    """
    t = frames.shape[0]
    n = int(round(t ** 0.5))
    if n * n != t:
        raise ValueError(f"video tiling: expected a square number of frames (4, 16, ...), got {t}")
    _, h, w, c = frames.shape
    return frames.reshape(n, n, h, w, c).transpose(0, 2, 1, 3, 4).reshape(n * h, n * w, c)
