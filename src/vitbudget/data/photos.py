"""Unlabelled photos for dense tasks: every image file under a folder (or a .tar/.tar.gz of one)."""
from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .folder import IMAGE_EXTENSIONS, read_image, resolve_split_dir
from .letterbox import LetterboxTransform


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a fixed (sorted) order; other files are ignored."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


class PhotoFolder(Dataset):
    """Item i: (letterboxed normalised input, its Box as a tensor). Photos of any size and aspect ratio."""

    def __init__(self, path: str | os.PathLike, transform: LetterboxTransform):
        self.root = resolve_split_dir(path, None)
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(f"no photos under {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = read_image(self.files[i])
        return self.transform(image), self.transform.box(image).as_tensor()

    def name(self, i: int) -> str:
        return str(self.files[i].relative_to(self.root))
