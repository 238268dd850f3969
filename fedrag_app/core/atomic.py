"""Atomic, durable writes: a reader (or a crash, or a power cut) never sees a half-written file or folder.

Everything this package persists (adapters, retrievers, shards, checkpoints, metrics, converted models) goes
through here: write into a temp sibling, fsync it, rename it over the target, fsync the parent folder. Without
the fsyncs a crash right after the rename can leave the new name pointing at empty files: a lost checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

Exists = Literal["replace", "keep", "error"]


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):  # a link's target is not ours to flush
                _fsync(Path(root) / name)
        _fsync(Path(root))


@contextlib.contextmanager
def atomic_path(path: str | Path, *, private: bool = False) -> Iterator[Path]:
    """Yield a temp name beside ``path`` for a writer that takes a file name (safetensors, savefig); once the
    block ends without error it is fsynced and renamed over ``path``; on error it is removed. The temp name ends
    with ``path``'s suffix (savefig picks the format from it). Mode 0600 if ``private``, else 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o600 if private else 0o644)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes, *, private: bool = False) -> None:
    """Write a file atomically and durably (``private``: readable by its owner only, e.g. a key)."""
    with atomic_path(path, private=private) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, *, private: bool = False) -> None:
    """Write a UTF-8 text file atomically and durably."""
    write_bytes(path, text.encode("utf-8"), private=private)


def write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Write JSON atomically; by default pretty-printed and key-sorted so diffs stay readable."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def swap_in(staged: str | Path, target: str | Path, *, exists: Exists = "replace") -> bool:
    """Move the finished folder ``staged`` to ``target`` (same file system), after fsyncing all it holds.

    If ``target`` exists (now, or made meanwhile by another process): ``replace`` puts ``staged`` in its place
    and deletes the old one; ``keep`` leaves it and returns False (``staged`` stays, for the caller to delete);
    ``error`` raises FileExistsError. Returns True when ``staged`` became ``target``."""
    staged, target = Path(staged), Path(target)
    _fsync_tree(staged)
    os.chmod(staged, 0o755)
    try:
        os.rename(staged, target)  # fails on an existing non-empty folder; never replaces one
    except OSError:
        if not target.exists():
            raise
        if exists == "keep":
            return False
        if exists == "error":
            raise FileExistsError(f"{target} exists") from None
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
        os.rename(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)
    return True


def staging_dir(target: str | Path, label: str = "tmp") -> Path:
    """A fresh empty folder ``.<name>.<label>-XXXX`` beside ``target`` (same file system, so it can be swapped in)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{label}-", dir=target.parent))


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, exists: Exists = "replace") -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it becomes ``target`` whole (``swap_in``: ``exists``
    says what happens to one already there), on error it is removed."""
    tmp = staging_dir(target)
    try:
        yield tmp
        swap_in(tmp, target, exists=exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `<target's folder>/.<name>.lock` while building `target`: processes that start at
    once (a simulation's nodes, test workers) wait for the first build instead of each repeating it."""
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
