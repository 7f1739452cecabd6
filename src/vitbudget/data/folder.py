"""ImageFolder datasets (root/<class>/<image>), from a directory or a tar archive of one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .archive import is_archive, unpack

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB, turning PIL's many failure modes into one DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


def find_split(root: Path, split: str | None) -> Path:
    """`root/split`, or `root/<one dir>/split` (archives usually wrap the tree in a folder).

    None, '' or '.' mean `root` itself is the split (root/<class>/<image>), e.g.
    `vitbudget eval --data corrupted/gaussian_noise --split .`.
    """
    if split is None or split in ("", "."):
        return root
    for candidate in [root / split, *sorted(p / split for p in root.iterdir() if p.is_dir())]:
        if candidate.is_dir():
            return candidate
    raise DataError(f"no {split!r} split under {str(root)!r} (looked for {split}/ and */{split}/)")


def resolve_split_dir(path: str | os.PathLike, split: str | None) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {str(path)!r} not found")
    if is_archive(path):
        path = unpack(path)
    elif not path.is_dir():
        raise DataError(f"dataset {str(path)!r} is neither a directory nor a .tar/.tar.gz archive")
    return find_split(path, split)


class ImageFolder(Dataset):
    """Samples (image, label) with labels from sorted class-folder names, as torchvision does.

    transform(image, rng) -> tensor; `rng_for(index)` supplies a per-sample generator so
    augmentation is reproducible whatever worker process decodes the sample.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, transform: Callable | None = None, unlabeled: bool = False):
        """unlabeled=True also accepts a flat folder of images (no class folders): one class named
        '' and label 0 for every image, for models whose outputs are not scored against labels."""
        self.root = resolve_split_dir(root, split)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes and unlabeled and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(self.root)):
            self.classes = [""]  # root/<image>: os.walk below reads the root itself
        if not self.classes:
            raise DataError(f"no class folders in {str(self.root)!r} (expected root/<class>/<image>)")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(self.root / name)):
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(self.root)!r}")
        self.transform = transform
        self.seed = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_image(path)
        if self.transform is None:
            return image, label
        return self.transform(image, self.rng_for(index)), label
