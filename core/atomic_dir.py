"""Files and directories published whole. Directories are built once under a file lock,
in a temporary sibling renamed into place, so concurrent builders do the work once and a
crash never leaves a half-written directory that a replica could load; small shared
files (memos in the cache, the adapter registry's state) are replaced atomically, so a
reader sees all or nothing. Both are fsync'ed before the rename that publishes them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(target: Path, marker: str, build: Callable[[Path], None],
               force: bool = False) -> bool:
    """Run `build(tmp)` and rename tmp to `target`, unless `target/marker` exists (before
    or after taking the lock; `force` rebuilds once regardless). Returns whether this call
    built it."""
    from filelock import FileLock

    if (target / marker).is_file() and not force:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / marker).is_file() and not force:
            return False
        # Under the lock nobody else builds `target`: a temporary directory of its name is
        # what a builder killed mid-build (SIGKILL: no `except` below ran) left behind.
        for stale in target.parent.glob(f".{target.name}.*"):
            suffix = stale.name[len(target.name) + 2:]  # mkdtemp's 8 characters, no dot
            if stale.is_dir() and len(suffix) == 8 and "." not in suffix:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            _fsync_tree(tmp)  # the files' data on disk before the rename publishes them
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
    return True


def _fsync_tree(top: Path) -> None:
    """Every file and directory under `top` flushed to disk: a rename can reach the disk
    before the data it publishes, and after a crash the marker would then stand beside
    empty or partial weights."""
    for directory, _, files in os.walk(top):
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and an atomic rename. The
    file's data reaches the disk before the rename, and the rename before this returns,
    so after a crash (or a node losing power) the path holds the old text or the new,
    never an empty or partial file: a rename can otherwise reach the disk first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
