"""Common corruptions (Hendrycks & Dietterich) applied to an ImageFolder split, reproducibly.

The corruptions come from the optional package `imagecorruptions-imaug` (import name
`imagecorruptions`; install with `pip install "vitbudget[robustness]"`). The original
`imagecorruptions` package no longer works with current NumPy.

Important: the package implements the **ImageNet-C** constants (tuned for 224 px images). The
CIFAR-10-C / CIFAR-100-C data sets were made with different, much milder constants for 32 px
images (e.g. defocus_blur uses a disk of radius 6 px here against 0.5 px in CIFAR-10-C at
severity 3; gaussian_noise sigma 0.18 against 0.08; JPEG quality 15 against 58). So a severity-3
set written here is "CIFAR-10-C-style" (same 15 types, same code path) but harsher than the
published CIFAR-10-C at severity 3; accuracies are not comparable with published CIFAR-C numbers.

All 15 common types run on 32x32 images (the package's minimum size; smaller images raise a
DataError). At 32 px several are extreme by construction: defocus_blur's disk is 13 px wide and
glass_blur (sigma 1, shuffles of +-2 px, 3 rounds) both leave little more than colour blobs;
motion_blur's kernel (radius 15 at severity 3) spans half the image; elastic_transform's
displacement field is smoothed over only 0.3 px, so it scatters single pixels rather than warping
the image; frost crops a 32x32 patch of a ~1000 px frost photograph (a smooth frost texture rather
than ice crystals). The shared reference ViT (60.0 % clean) scores 27-51 % on the 500-image checks
made (gaussian_noise 26.8, defocus_blur 33.6, elastic_transform 36.2, jpeg_compression 51.0).
Per-image cost at 32 px is 0.1-10 ms (frost, which re-reads its photograph, is the slowest);
glass_blur's first call in a process JIT-compiles a numba kernel (about 4 s).

Reproducibility: the package draws from NumPy's global RNG (and glass_blur / impulse_noise from a
`seed` argument). Each image is corrupted with the global RNG seeded from
(seed, corruption index, image index), where the image index is the image's position in the
whole source split, so an image gets the same corruption whatever `limit` selects; the caller's
global RNG state is restored afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, OutputError
from ..io import staging_dir_beside
from .loader import subset_indices

# The 15 standard (test) corruptions, in the package's order; their index seeds the RNG.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# The package's four extra "validation" corruptions, also accepted (indices 15-18).
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
_TAKES_SEED = ("glass_blur", "impulse_noise")  # they draw from their own seeded generator, not np.random
MIN_SIZE = 32
MANIFEST = ".vitbudget-corrupted.json"
PACKAGE = "imagecorruptions-imaug"


def _backend() -> Callable[..., np.ndarray]:
    """The package's `corrupt` function, or a DataError saying how to install it."""
    try:
        from imagecorruptions import corrupt
    except ImportError as exc:
        raise DataError(f"corruptions need the optional package {PACKAGE!r}: pip install 'vitbudget[robustness]' ({exc})") from exc
    return corrupt


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def check_corruption(name: str, severity: int) -> int:
    """The corruption's index (seeds its RNG); ConfigError for an unknown name or bad severity."""
    if name not in ALL_CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; available: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return ALL_CORRUPTIONS.index(name)


def parse_corruptions(text: str | None) -> list[str]:
    """'a,b,c' -> names (validated); None, '' or 'all' -> the 15 standard corruptions."""
    if not text or text == "all":
        return list(CORRUPTIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        check_corruption(n, 3)
    return list(dict.fromkeys(names))


def corrupt_image(pixels: np.ndarray, corruption: str, severity: int = 3, seed: int = 0, index: int = 0) -> np.ndarray:
    """Corrupt one HxWx3 uint8 image; the result depends only on (pixels, corruption, severity, seed, index)."""
    cidx = check_corruption(corruption, severity)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise DataError(f"expected an HxWx3 uint8 image, got {pixels.shape} {pixels.dtype}")
    h, w = pixels.shape[:2]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise DataError(f"{corruption} needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (the package's minimum), got {w}x{h}")
    corrupt = _backend()
    state = np.random.get_state()
    try:
        np.random.seed([seed & 0xFFFFFFFF, cidx, index & 0xFFFFFFFF])
        kwargs = {"seed": int(np.random.randint(2**31 - 1))} if corruption in _TAKES_SEED else {}
        out = corrupt(pixels, corruption_name=corruption, severity=int(severity), **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.shape != pixels.shape:  # the package documents 'same shape as input'; check, do not trust
        raise DataError(f"{corruption} returned shape {out.shape} for an image of shape {pixels.shape}")
    return out.astype(np.uint8)


# -- atomically written directory trees with a completeness manifest (shared with counting.py) --

def tree_is_complete(dest: Path, manifest_name: str, spec: dict[str, Any]) -> bool:
    """True if `dest` holds a tree written for exactly `spec` with all its files still present."""
    manifest = dest / manifest_name
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    files = sum(len(fs) for _, _, fs in os.walk(dest)) - 1
    return recorded.get("spec") == spec and recorded.get("files") == files


@contextmanager
def atomic_tree(dest: str | os.PathLike, manifest_name: str, spec: dict[str, Any], extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success write the manifest and rename it to `dest`.

    An existing `dest` is replaced only if it carries our manifest (a stale or damaged earlier
    output); a non-empty directory of someone else's is never deleted.
    """
    dest = Path(dest)
    if dest.exists() and not (dest / manifest_name).is_file() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{str(dest)!r} exists and was not written by vitbudget; choose another output or delete it")
    tmp = staging_dir_beside(dest)
    try:
        yield tmp
        files = sum(len(fs) for _, _, fs in os.walk(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the finished tree is an ordinary directory
        (tmp / manifest_name).write_text(json.dumps({"spec": spec, "files": files, **(extra or {})}, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as exc:
        raise OutputError(f"cannot write {str(dest)!r}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _source_images(src: Path) -> list[tuple[str, str]]:
    """(path, relative output path .png) for every image of an ImageFolder split, in ImageFolder's order."""
    from .folder import ImageFolder

    ds = ImageFolder(src)
    out, seen = [], {}
    for path, _ in ds.samples:
        rel = Path(os.path.relpath(path, ds.root)).with_suffix(".png").as_posix()
        if rel in seen:
            raise DataError(f"{path!r} and {seen[rel]!r} would both be written as {rel!r}")
        seen[rel] = path
        out.append((path, rel))
    return out


def corrupt_folder(
    src_split_dir: str | os.PathLike, dest_dir: str | os.PathLike, corruption: str, severity: int = 3, seed: int = 0,
    limit: int | None = None, progress: bool = False,
) -> Path:
    """Write a corrupted copy of an ImageFolder split (root/<class>/<image>) as PNG under `dest_dir`.

    `limit` keeps the same pseudo-random subset of images that `vitbudget eval --limit` picks
    (subset_indices with seed 0), so corrupted and clean results pair image by image. Written
    atomically; an existing complete output for the same arguments is reused as is.
    """
    from tqdm.auto import tqdm

    from .folder import read_image

    check_corruption(corruption, severity)
    src = Path(src_split_dir)
    images = _source_images(src)
    indices = subset_indices(len(images), limit)
    spec = {"source": str(src.resolve()), "images": len(images), "corruption": corruption, "severity": int(severity),
            "seed": int(seed), "limit": limit, "package": package_version()}
    dest = Path(dest_dir)
    if tree_is_complete(dest, MANIFEST, spec):
        return dest
    _backend()  # fail before creating anything if the package is missing
    with atomic_tree(dest, MANIFEST, spec) as tmp:
        made: set[Path] = set()
        for i in tqdm(indices, desc=f"{corruption} s{severity}", unit="img", disable=not progress, leave=False):
            path, rel = images[i]
            pixels = np.asarray(read_image(path), dtype=np.uint8)
            out = corrupt_image(pixels, corruption, severity, seed, i)
            target = tmp / rel
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            Image.fromarray(out).save(target, format="PNG")
    return dest


def corrupt_split(
    src_split_dir: str | os.PathLike, out_dir: str | os.PathLike, corruptions: list[str] | None = None, severity: int = 3,
    seed: int = 0, limit: int | None = None, progress: bool = False,
) -> dict[str, Path]:
    """corrupt_folder for each corruption into out_dir/<corruption>/ (an ImageFolder each)."""
    names = list(corruptions or CORRUPTIONS)
    for n in names:
        check_corruption(n, severity)
    return {n: corrupt_folder(src_split_dir, Path(out_dir) / n, n, severity, seed, limit, progress) for n in names}
