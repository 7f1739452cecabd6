"""ImageFolder datasets (root/<class>/<image>), from a directory or a tar archive of one."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .archive import is_archive, unpack
from .download import SOURCES, named_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB, turning PIL's many failure modes into one DataError.

    16-bit greyscale (PNG, TIFF) is scaled to 8 bits (PIL's own RGB conversion would clip
    everything above 255 to white); 32-bit integer and float images have no agreed range and
    are refused, as are images larger than PIL's decompression-bomb limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clearer message
            with Image.open(path) as img:
                if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                    raise DataError(_too_large(path, img.width, img.height))
                img.load()
                return to_rgb(img, path)
    except Image.DecompressionBombError:
        raise DataError(_too_large(path)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


def _too_large(path, width: int | None = None, height: int | None = None) -> str:
    size = f" ({width}x{height} pixels)" if width else ""
    return (f"image {str(path)!r}{size} is larger than the {Image.MAX_IMAGE_PIXELS} pixels PIL decodes safely "
            "(a possible decompression bomb); resize it first")


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """8-bit RGB from any PIL mode we can interpret without guessing a value range."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):  # 16-bit greyscale
        pixels = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(pixels / 257.0).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(f"cannot read image {str(path)!r}: {kind} pixels have no standard range; save it as 8- or 16-bit")
    return img.convert("RGB")


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
    if not path.exists() and str(path) in SOURCES:  # a known name: fetched from its official source
        path = named_dataset(str(path))
    if not path.exists():
        raise DataError(f"dataset {str(path)!r} not found")
    if is_archive(path):
        path = unpack(path)
    elif not path.is_dir():
        raise DataError(f"dataset {str(path)!r} is neither a directory nor a .tar/.tar.gz archive")
    return find_split(path, split)


def image_files(top: Path) -> list[str]:
    """Paths of the images under `top`, in os.walk order (directories by path, names sorted).

    An image name that is not a regular file (a named pipe, socket, device, or a broken link) is
    a DataError: opening a named pipe blocks forever, and the others fail mid-run. Directory
    entries' types come from the listing itself, so this costs no extra system call per image.
    """
    listed: list[tuple[str, list[str]]] = []
    pending = [str(top)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError:
            continue  # as os.walk: an unreadable folder is skipped
        names = []
        for entry in entries:
            if entry.is_dir():
                if not entry.is_symlink():  # os.walk's default: symbolic links to folders are not followed
                    pending.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if not entry.is_file():
                    kind = "a broken symbolic link" if entry.is_symlink() else "not a regular file (e.g. a named pipe or a device)"
                    raise DataError(f"{entry.path!r} is {kind}; remove it from the dataset folder")
                names.append(entry.name)
        listed.append((folder, sorted(names)))
    return [os.path.join(folder, name) for folder, names in sorted(listed) for name in names]


class ImageFolder(Dataset):
    """Samples (image, label) from root/<class>/<image>.

    Labels follow sorted class-folder names, as torchvision's do, unless `label_names` (a
    model's class names, one per output) is given: then a folder's label is its name's index
    there, so a split holding only some of the model's classes is labelled correctly. A folder
    the model does not know is a DataError naming both lists; `allow_class_mismatch=True`
    evaluates anyway, with labels in sorted folder order. `label_note` says, in one line,
    whenever labels do not simply follow the model's own names (None when they do).

    transform(image, rng) -> tensor; `rng_for(index)` supplies a per-sample generator so
    augmentation is reproducible whatever worker process decodes the sample.
    """

    def __init__(
        self, root: str | os.PathLike, split: str | None = None, transform: Callable | None = None, *,
        label_names: Sequence[str] | None = None, allow_class_mismatch: bool = False, unlabeled: bool = False,
    ):
        """unlabeled=True (a model with no head: outputs are not scored against labels) also accepts
        a flat folder of images (one class named '' and label 0 for every image) and skips the
        class-name checks."""
        self.root = resolve_split_dir(root, split)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes and unlabeled and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(self.root)):
            self.classes = [""]  # root/<image>: os.walk below reads the root itself
        if not self.classes:
            raise DataError(f"no class folders in {str(self.root)!r} (expected root/<class>/<image>)")
        files = {name: image_files(self.root / name) for name in self.classes}
        if not any(files.values()):
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(self.root)!r}")
        if unlabeled:
            self.class_to_idx, self.label_note = {name: i for i, name in enumerate(self.classes)}, None
        else:
            self.class_to_idx, self.label_note = class_labels(self.classes, label_names, allow_class_mismatch, where=str(self.root))
        self.labels_by_name = label_names is not None and self.label_note is None
        self.samples: list[tuple[str, int]] = [(path, self.class_to_idx[name]) for name in self.classes for path in files[name]]
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


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def class_labels(
    folders: Sequence[str], label_names: Sequence[str] | None, allow_mismatch: bool = False, where: str = "the data",
) -> tuple[dict[str, int], str | None]:
    """Each class folder's label, and a one-line note when labels do not follow the model's names.

    - no names (e.g. a plain timm state dict): sorted folder order, and a note saying so;
    - names: the index of the folder's name among them (a subset of the classes is fine);
      an unknown folder is a DataError naming both lists, or with `allow_mismatch` sorted
      folder order and a note warning that labels may not be the model's classes.
    """
    sorted_order = {name: i for i, name in enumerate(folders)}
    if label_names is None:
        return sorted_order, ("the model has no class names; labels follow the sorted class-folder names "
                              f"({', '.join(f'{n}={i}' for n, i in list(sorted_order.items())[:4])}{', ...' if len(folders) > 4 else ''})")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [name for name in folders if name not in index]
    if not unknown:
        return {name: index[name] for name in folders}, None
    if not allow_mismatch:
        raise DataError(f"class folders of {where} are not the model's classes: {_listing(unknown)} unknown to the model; "
                        f"folders {_listing(list(folders))}, model classes {_listing(list(label_names))} "
                        "(--allow-class-mismatch evaluates anyway, labels in sorted folder order)")
    return sorted_order, (f"class folders {_listing(unknown)} are not among the model's classes; as asked "
                          "(--allow-class-mismatch), labels follow the sorted folder names and may not mean what the model's outputs mean")
