"""Image preprocessing without torchvision: decode with PIL, resize, crop, normalise, augment."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..models.config import Preprocess

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def shortest_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the short side `side` and the long side int(side * long / short), truncated
    as torchvision's `_compute_resized_output_size` and Hugging Face's shortest-edge resize do."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    return (side, new_long) if width <= height else (new_long, side)


class EvalTransform:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalise (timm's eval).

    Any size and aspect ratio is accepted (smaller images are upscaled); with the preprocess's
    resize='squash' both sides go to img_size / crop_pct, as Hugging Face's ViT processor does.
    """

    def __init__(self, img_size: int, preprocess: Preprocess):
        self.img_size = img_size
        self.pre = preprocess
        self.mean = np.asarray(preprocess.mean, dtype=np.float32)
        self.std = np.asarray(preprocess.std, dtype=np.float32)

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        size = self.img_size
        if image.size != (size, size):
            side = math.floor(size / self.pre.crop_pct)
            if self.pre.resize == "squash":
                new = (side, side)
            else:
                new = tuple(max(size, n) for n in shortest_side_size(image.width, image.height, side))
            image = image.resize(new, _RESAMPLE.get(self.pre.interpolation, Image.BILINEAR))
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> Tensor:
        arr = (pixels.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> Tensor:
        return self.normalise(self.resize_crop(image))


class PadCropFlip(EvalTransform):
    """CIFAR training augmentation: reflect-pad, random crop back to size, random horizontal flip.

    Randomness comes from the caller's generator, so a sample's augmentation is a function of
    (seed, epoch, index) alone and a resumed run sees exactly the same pixels.
    """

    def __init__(self, img_size: int, preprocess: Preprocess, padding: int = 4, flip: bool = True):
        super().__init__(img_size, preprocess)
        self.padding = padding
        self.flip = flip

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> Tensor:
        rng = rng or np.random.default_rng()
        pixels = self.resize_crop(image)
        p = self.padding
        if p:
            padded = np.pad(pixels, ((p, p), (p, p), (0, 0)), mode="reflect")
            top, left = rng.integers(0, 2 * p + 1, size=2)
            pixels = padded[top : top + self.img_size, left : left + self.img_size]
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return self.normalise(pixels)
