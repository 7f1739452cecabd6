"""What a training split looks like, so any image folder can be trained on: its image sizes and
colour modes (one note per run about what is converted), a default input size, and its per-channel
mean and standard deviation for normalisation.

All of it reads a fixed pseudo-random subset (subset_indices, seed 0), so it is a function of the
data alone and a resumed run computes the same values.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..models.config import Preprocess
from .folder import ImageFolder, read_image
from .loader import subset_indices
from .transforms import EvalTransform

HEADER_SAMPLE = 500  # images whose headers (size, mode) are read: cheap, no decoding
STATS_SAMPLE = 2000  # images decoded for mean and std

MODE_NAMES = {
    "L": "grayscale (L)", "LA": "grayscale with alpha (LA)", "I;16": "16-bit grayscale (I;16)", "I;16B": "16-bit grayscale (I;16B)",
    "I;16L": "16-bit grayscale (I;16L)", "I": "32-bit grayscale (I)", "F": "float grayscale (F)", "1": "1-bit (1)", "P": "palette (P)",
    "PA": "palette with alpha (PA)", "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV", "RGBX": "RGBX",
}


def image_headers(dataset: ImageFolder, limit: int | None = HEADER_SAMPLE) -> list[tuple[str, tuple[int, int]]]:
    """(mode, (width, height)) of a fixed subset of the dataset's images, read from their headers."""
    out = []
    for i in subset_indices(len(dataset), limit):
        path = dataset.samples[i][0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    out.append((img.mode, img.size))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            continue  # unreadable or oversized files are reported, with their path, by read_image when the loader reaches them
    return out


def infer_img_size(dataset: ImageFolder, patch_size: int | None = None) -> int:
    """The most common short side among sampled images, rounded down to a multiple of `patch_size`."""
    headers = image_headers(dataset)
    if not headers:
        return 32
    side = Counter(min(size) for _, size in headers).most_common(1)[0][0]
    return max(patch_size or 1, side - side % (patch_size or 1))


def default_patch_size(img_size: int) -> int:
    """A grid of at most ~14 x 14 patches: 4 px up to 32 px images, 8 px up to 96 px, then 16 px (ViT-B/16 at 224)."""
    return 4 if img_size <= 32 else 8 if img_size <= 96 else 16


def conversion_notes(dataset: ImageFolder, img_size: int, preprocess: Preprocess, what: str = "images") -> list[str]:
    """One line per conversion the sampled images need: colour mode, and size (resize, crop)."""
    headers = image_headers(dataset)
    notes = []
    modes = Counter(mode for mode, _ in headers if mode != "RGB")
    if modes:
        kinds = ", ".join(f"{n} {MODE_NAMES.get(m, m)}" for m, n in modes.most_common())
        notes.append(f"note: {what}: {kinds} of {len(headers)} sampled are not RGB: converted to 3-channel RGB "
                     "(grey replicated, alpha dropped)")
    sizes = Counter(size for _, size in headers)
    if sizes and set(sizes) != {(img_size, img_size)}:
        (w0, h0), (w1, h1) = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        span = f"{w0}x{h0}" if (w0, h0) == (w1, h1) else f"{w0}x{h0} to {w1}x{h1}"
        if preprocess.resize == "squash":
            how = f"resized to {img_size}x{img_size} (aspect ratio not kept)"
        else:
            short = math.floor(img_size / preprocess.crop_pct)
            how = f"short side resized to {short}, centre {img_size}x{img_size} cropped"
        notes.append(f"note: {what} are {span} px (in a sample of {len(headers)}), not {img_size}x{img_size}: {how}")
    return notes


def channel_mean_std(dataset: ImageFolder, img_size: int, limit: int | None = STATS_SAMPLE, progress: bool = False) -> tuple[tuple, tuple]:
    """Per-channel mean and std of pixels in [0, 1] after resizing and cropping to img_size (a fixed subset)."""
    plain = EvalTransform(img_size, Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    indices = subset_indices(len(dataset), limit)
    for i in tqdm(indices, desc="mean/std", unit="img", disable=not progress, leave=False):
        pixels = plain.resize_crop(read_image(dataset.samples[i][0])).reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        squares += (pixels * pixels).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(max(v, 1e-3)), 4) for v in std)
