"""Unpack ImageFolder archives (.tar / .tar.gz) once into a cache, with an integrity check."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from ..errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST = ".vitbudget-unpacked.json"


def cache_root() -> Path:
    """$VITBUDGET_CACHE, else $XDG_CACHE_HOME/vitbudget, else ~/.cache/vitbudget."""
    if os.environ.get("VITBUDGET_CACHE"):
        return Path(os.environ["VITBUDGET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitbudget"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) - 1  # minus the manifest


def unpack(archive: str | os.PathLike, cache: Path | None = None) -> Path:
    """Directory holding the archive's contents; extracted on first use, verified on every use.

    The cache key is the archive's SHA-256, so a changed archive is unpacked anew. Extraction
    goes to a temporary directory renamed into place, so an interrupted unpack leaves nothing
    that looks complete.
    """
    archive = Path(archive)
    if not is_archive(archive):
        raise DataError(f"{str(archive)!r} is not a .tar or .tar.gz file")
    sha = file_sha256(archive)
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    dest = (cache or cache_root()) / "datasets" / f"{stem}-{sha[:16]}"
    if _is_complete(dest, sha):
        return dest
    try:
        if dest.is_dir() and not dest.is_symlink():  # damaged, stale or half-written: unpack again
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    except OSError as exc:
        raise DataError(f"cannot unpack {str(archive)!r} into the cache {str(dest.parent)!r}: {exc.strerror or exc}") from exc
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        files = _count_files(tmp) + 1  # no manifest yet
        (tmp / MANIFEST).write_text(json.dumps({"archive": str(archive), "sha256": sha, "files": files}))
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and _is_complete(dest, sha):  # another process unpacked it meanwhile
            return dest
        raise DataError(f"cannot unpack {str(archive)!r}: {_unpack_failure(exc)}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _unpack_failure(exc: BaseException) -> str:
    """One line for why extraction failed; tarfile's 'could not be opened' lists every method it tried."""
    detail = str(exc).strip()
    if isinstance(exc, (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, gzip.BadGzipFile)):
        return "it is damaged or not a .tar / .tar.gz archive" + (f" ({detail})" if detail and "\n" not in detail else "")
    return " ".join(detail.split())


def _is_complete(dest: Path, sha: str) -> bool:
    """True when `dest` holds a finished unpack of the archive with this SHA-256, nothing missing.

    An unreadable or malformed manifest counts as damage (the caller unpacks again), never as an error.
    """
    try:
        recorded = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("sha256") == sha and recorded.get("files") == _count_files(dest)
