"""Atomic writes: all or nothing, and the result is an ordinary file; a run's files are published together."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vitbudget import OutputError
from vitbudget.io import OutputDir, atomic_path, write_json, write_text


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_block_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# -- OutputDir: a run's files are checked before the work and published together after it --
def test_output_dir_publishes_all_files_in_the_listed_order(tmp_path, monkeypatch):
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real_replace(a, b)))
    out = OutputDir(tmp_path / "runs" / "a", ["second.json", "first.md"])
    assert not (tmp_path / "runs").exists()  # nothing is created before the work is done
    with out.publish() as stage:
        write_text(stage / "first.md", "1")
        write_json(stage / "second.json", {"x": 2})
        (stage / "extra.txt").write_text("3")
    assert moved[-3:] == ["second.json", "first.md", "extra.txt"]
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == ["extra.txt", "first.md", "second.json"]


def test_output_dir_failure_publishes_nothing_and_removes_what_it_created(tmp_path):
    out = OutputDir(tmp_path / "new" / "out", ["a.txt", "b.txt"])
    with pytest.raises(RuntimeError):
        with out.publish() as stage:
            write_text(stage / "a.txt", "complete")
            raise RuntimeError("crash while writing b.txt")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "a.txt").write_text("previous run")
    with pytest.raises(RuntimeError):
        with OutputDir(existing, ["a.txt"]).publish() as stage:
            write_text(stage / "a.txt", "new run")
            raise RuntimeError("crash")
    assert [p.name for p in existing.iterdir()] == ["a.txt"] and (existing / "a.txt").read_text() == "previous run"


def test_full_disk_is_an_output_error_and_nothing_is_published(tmp_path):
    out = OutputDir(tmp_path / "out", ["results.json", "predictions.npz"])
    with pytest.raises(OutputError, match="No space left on device; nothing was published"):
        with out.publish() as stage:
            write_json(stage / "results.json", {"top1": 1})
            with open(stage / "predictions.npz", "wb"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not (tmp_path / "out").exists()
    with pytest.MonkeyPatch.context() as patch:  # the disk fills inside the single-file writer: the message names --out
        patch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        with pytest.raises(OutputError, match=r"^cannot write to '[^']*/out': No space left on device; nothing was published$"):
            with out.publish() as stage:
                write_json(stage / "results.json", {"top1": 1})
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputError, match="cannot write .*No space left"):  # the single-file writer says the same
        with atomic_path(tmp_path / "x.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setup, files, message", [
    (lambda d: (d / "out").write_text("x"), [], "out' is not writable: it exists and is not a directory"),
    (lambda d: (d / "f").write_text("x"), [], "is not writable: '.*/f' is not a directory"),
    (lambda d: (d / "out" / "results.json").mkdir(parents=True), ["results.json"], "results.json': it exists and is not a file"),
])
def test_output_dir_is_checked_before_any_work(tmp_path, setup, files, message):
    setup(tmp_path)
    target = tmp_path / ("f/sub" if (tmp_path / "f").exists() else "out")
    with pytest.raises(OutputError, match=message):
        OutputDir(target, files)


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod cannot deny access
    with pytest.raises(OutputError, match="not writable: permission denied"):
        OutputDir(tmp_path / "out")


def test_failure_while_publishing_restores_the_previous_run(tmp_path, monkeypatch):
    """The 2nd rename fails after the 1st replaced an old file: the directory is exactly as before
    (old contents and mtimes back, no file of the new run), and an OutputError names --out."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "keep.txt"):
        (out / name).write_text(f"previous {name}")
        os.utime(out / name, (1_000_000, 1_000_000))
    before = {p.name: (p.read_text(), p.stat().st_mtime) for p in out.iterdir()}
    real_replace, published = os.replace, []

    def replace(src, dst):
        if Path(src).parent.name.startswith(".staging-") and Path(dst).parent == out:
            if published:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            published.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="nothing was published"):
        with OutputDir(out, ["a.txt", "new.txt", "b.txt"]).publish() as stage:
            for name in ("a.txt", "new.txt", "b.txt"):
                write_text(stage / name, f"new {name}")
    assert published == ["a.txt"]  # the failure came after a file of the new run was in place
    assert {p.name: (p.read_text(), p.stat().st_mtime) for p in out.iterdir()} == before
