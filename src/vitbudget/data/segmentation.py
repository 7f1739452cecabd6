"""Segmentation folders in the ADE20K layout: images/<split>/NAME.jpg with annotations/<split>/NAME.png,
index masks (one class id per pixel, 255 = ignore). Every pair is checked when the folder is opened, so a
bad mask is one clear error before any work, not a crash mid-training."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..models.config import Preprocess
from .folder import IMAGE_EXTENSIONS, read_image
from .transforms import EvalTransform

IGNORE_INDEX = 255


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids from a single-channel (L or P) PNG."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DataError(f"mask {str(path)!r} is {img.mode}, not a single-channel index image (mode L or P, one class id per pixel)")
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {str(path)!r}: {exc}") from exc


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header; DataError for a file that is not an image."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


class SegmentationFolder(Dataset):
    """Item i: (image resized to img_size x img_size and normalised, mask resized by nearest neighbour, long).

    Both are squashed to the square model input (aspect ratio not kept): mIoU is measured at that resolution.
    num_classes: given, or (None) one more than the largest label in this split's masks.
    """

    def __init__(self, root: str | os.PathLike, split: str, img_size: int, preprocess: Preprocess, num_classes: int | None = None):
        root = Path(root)
        images, masks = root / "images" / split, root / "annotations" / split
        for d in (images, masks):
            if not d.is_dir():
                raise DataError(f"segmentation data {str(root)!r} has no {d.relative_to(root)}/ (layout: images/{split}/ and annotations/{split}/, as ADE20K)")
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise DataError(f"no images in {str(images)!r}")
        self.masks = [masks / (p.stem + ".png") for p in self.images]
        labels = self._check(num_classes)
        self.num_classes = num_classes if num_classes is not None else int(max(labels)) + 1
        self.transform = EvalTransform(img_size, Preprocess(preprocess.mean, preprocess.std, 1.0, "bilinear", "squash"))
        self.img_size = img_size

    def _check(self, num_classes: int | None) -> set[int]:
        labels: set[int] = set()
        for image, mask in zip(self.images, self.masks):
            if not mask.is_file():
                raise DataError(f"image {str(image)!r} has no mask {str(mask)!r}")
            ids = read_mask(mask)
            if ids.shape != _image_size(image):
                raise DataError(f"mask {str(mask)!r} is {ids.shape[1]}x{ids.shape[0]} but its image is "
                                f"{_image_size(image)[1]}x{_image_size(image)[0]} (width x height): they must match")
            present = {int(v) for v in np.unique(ids)} - {IGNORE_INDEX}
            if num_classes is not None and present and max(present) >= num_classes:
                raise DataError(f"mask {str(mask)!r} holds label {max(present)}, out of range for {num_classes} classes "
                                f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
            labels |= present
        if not labels:
            raise DataError(f"every mask under {str(self.masks[0].parent)!r} is all ignore ({IGNORE_INDEX})")
        return labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.transform(read_image(self.images[i]))
        mask = Image.fromarray(read_mask(self.masks[i])).resize((self.img_size, self.img_size), Image.NEAREST)
        return image, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
