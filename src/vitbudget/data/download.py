"""Data sets fetched from their official source when the project's shared copy is not there.

`--data cifar10` (and the default data outside the repository) is CIFAR-10 from its authors'
page: the python archive, checked against its published MD5, converted once into an
ImageFolder of PNGs (`train/<class>/NNNNN.png`, `test/...`) in the cache. Nothing is trusted
before the checksum matches, and a half-finished download or conversion never looks finished.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DataError
from .archive import cache_root


@dataclass(frozen=True)
class Source:
    """Where a data set comes from and the checksum that proves it arrived whole."""

    name: str
    url: str
    md5: str
    classes: tuple[str, ...]


# The archive torchvision's CIFAR10 also downloads (same URL and MD5).
CIFAR10 = Source(
    name="cifar10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
)
SOURCES = {CIFAR10.name: CIFAR10}
DONE = ".vitbudget-converted"


def named_dataset(name: str, progress: bool = True) -> Path:
    """The ImageFolder root of a known data set name, downloaded and converted on first use."""
    source = SOURCES[name]
    root = cache_root() / "datasets" / f"{source.name}-{source.md5[:12]}"
    if (root / DONE).is_file():
        return root
    archive = download(source, progress)
    _convert_cifar(archive, root, source, progress)
    return root


def download(source: Source, progress: bool = True) -> Path:
    """The verified archive in the cache's downloads/ folder (kept, so a conversion can be redone offline)."""
    target = cache_root() / "downloads" / Path(source.url).name
    if target.is_file() and _md5(target) == source.md5:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        raise DataError(f"cannot write to the cache {str(target.parent)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {source.name}", disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = _md5(Path(part))
        if got != source.md5:
            raise DataError(f"{source.url} arrived with MD5 {got}, expected {source.md5}: a damaged or changed download; nothing was kept")
        os.replace(part, target)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise DataError(f"cannot download {source.name} from {source.url}: {reason} "
                        "(offline? pass --data DIR, or set VITBUDGET_SHARED to the project's shared/ folder)") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _convert_cifar(archive: Path, root: Path, source: Source, progress: bool) -> None:
    """The python batches (checksummed above, so unpickling them is safe) as PNGs, renamed into place whole."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, names in BATCHES.items():
                count = 0
                for name in tqdm(names, desc=f"convert {source.name} {split}", unit="batch", disable=not progress):
                    if name not in members:
                        raise DataError(f"{str(archive)!r} has no {name}: not the CIFAR-10 python archive")
                    batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")
                    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                    for image, label in zip(images, batch[b"labels"]):
                        folder = tmp / split / source.classes[label]
                        folder.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(image).save(folder / f"{count:05d}.png")
                        count += 1
        (tmp / DONE).write_text(source.md5)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except (tarfile.TarError, OSError, KeyError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot convert {str(archive)!r}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
