"""Atomic file writing: a crash or a full disk never leaves a half-written result behind.

`atomic_path` / `write_text` / `write_json` replace one file at a time; `OutputDir` publishes
the files of a whole run together (use it for every command that writes results).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import OutputError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove we can write there, before any long work starts.

    For outputs built up piece by piece and resumed; a command's result files use `OutputDir`.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"output directory {str(path)!r} is not writable: {exc.strerror or exc}") from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any new file
        os.replace(tmp_path, path)
    except OSError as exc:  # e.g. the disk filled up while writing
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


# -- publishing a run's files together --
class OutputDir:
    """A command's output directory: checked before the work, filled all at once after it.

    Every command that writes result files uses it the same way::

        out = OutputDir(args.out, ["results.json", "results.md"])  # OutputError now, before any work
        ...                                                         # the long work
        with out.publish() as stage:                                # a hidden staging dir inside out
            write_json(stage / "results.json", report)              # write every file here
        # on leaving the block all files are moved into `out` (renames on one filesystem), in the
        # order `files` lists them; on any exception none is, and `out` is left as it was
        # (a failed move puts back the files already replaced; a directory the command created
        # is removed again).

    Checked up front: `out` (or its nearest existing parent) is a writable directory, and no
    listed file name is taken by a directory. Nothing is created until `publish`, so an
    early failure leaves no empty output directory behind.
    """

    def __init__(self, path: str | os.PathLike, files: Iterable[str] = ()):
        self.path = Path(path)
        self.files = list(files)
        check_output_dir(self.path, self.files)

    @contextlib.contextmanager
    def publish(self) -> Iterator[Path]:
        created = _missing_dirs(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(dir=self.path, prefix=".staging-"))
        except OSError as exc:
            _remove_empty(created)
            raise OutputError(f"cannot write to {str(self.path)!r}: {exc.strerror or exc}") from exc
        try:
            yield stage
            names = [n for n in self.files if (stage / n).exists()]
            names += sorted(n for n in os.listdir(stage) if n not in names)
            check_output_dir(self.path, names)  # a file name may have been taken while we worked
            _replace_all(stage, self.path, names)
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)
            _remove_empty(created)
            cause = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, OutputError) else None
            if isinstance(cause, OSError):  # a full disk, a quota: the user's problem, not a bug; name --out, not the staging dir
                raise OutputError(f"cannot write to {str(self.path)!r}: {cause.strerror or cause}; nothing was published") from exc
            raise
        shutil.rmtree(stage, ignore_errors=True)


def _replace_all(stage: Path, path: Path, names: list[str]) -> None:
    """Move `names` from `stage` into `path`, all or none: the files they replace are set aside
    first and put back if any move fails (a full disk, an I/O error on the 2nd of 3 files)."""
    previous = Path(tempfile.mkdtemp(dir=stage, prefix=".previous-"))
    moved: list[tuple[str, bool]] = []  # (name, whether an older file was set aside)
    try:
        for name in names:
            had = (path / name).exists()
            if had:
                os.replace(path / name, previous / name)
            moved.append((name, had))
            os.replace(stage / name, path / name)
    except BaseException:
        for name, had in reversed(moved):
            if had:
                os.replace(previous / name, path / name)
            else:
                (path / name).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, files: Iterable[str] = ()) -> Path:
    """OutputError unless `path` is, or can be created as, a writable directory whose `files` are free."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail later
            raise OutputError(f"output {str(existing)!r} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        reason = "it exists and is not a directory" if existing == path else f"{str(existing)!r} is not a directory"
        raise OutputError(f"output directory {str(path)!r} is not writable: {reason}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {str(path)!r} is not writable: permission denied on {str(existing)!r}")
    for name in files:
        target = path / name
        if target.exists() and not target.is_file():
            raise OutputError(f"cannot write {str(target)!r}: it exists and is not a file")
    return path


@contextlib.contextmanager
def removed_if_empty_on_error(path: str | os.PathLike) -> Iterator[Path]:
    """For outputs filled piece by piece (each piece atomically): if the block fails, the directories
    it created for `path` are removed again where it left them empty, so a failed first run leaves nothing."""
    path = Path(path)
    created = _missing_dirs(path)
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `mkdir(parents=True)` would create, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return


def staging_dir_beside(dest: str | os.PathLike) -> Path:
    """A new private folder next to `dest` (same file system, so a finished result moves into
    place with a rename); OutputError in one line when it cannot be made."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    except OSError as exc:
        raise OutputError(f"cannot write {str(dest)!r}: {exc.strerror or exc}") from exc
