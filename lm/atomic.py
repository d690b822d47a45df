"""Write-then-rename helpers: a reader never sees a half-written file or directory, and processes that
build the same thing at once neither collide nor build it twice.

Locks are ``flock`` advisory locks: the kernel releases them when the holder exits or is killed, so a crashed
builder never leaves a key locked. Every cache stage builds through ``build_once``; every directory swap takes
the parent directory's lock for its two renames.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
LOCKS = ".locks"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting while another process holds it.

    ``path`` is a lock file (created if missing, never deleted: removing it could hand two processes
    two different files) or an existing directory.
    """
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build_once(root: Path, key: str, find: Callable[[], T | None], build: Callable[[], T]) -> T:
    """``find()``'s verified result for ``key`` under ``root``, else ``build()``'s — one builder per key.

    Processes that miss at once queue on ``<root>/.locks/<key>.lock``; each looks again when its turn
    comes, so all but the first find the first one's result and use it instead of building it again.
    """
    if (hit := find()) is not None:
        return hit
    with locked(Path(root) / LOCKS / f"{key}.lock"):
        if (hit := find()) is not None:
            return hit
        return build()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    On an exception the temporary directory is removed and ``target`` is left as it was. Processes
    finishing at once take turns (the parent directory's lock): each swap is whole, the last one stays.
    """
    target = Path(target)
    with staged_dir(target.parent, target.name) as tmp:
        yield tmp
        replace_dir(tmp, target)


@contextmanager
def staged_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new temporary directory ``<parent>/.<name>.tmp-*`` for a directory whose final name may not be known
    until it is written (a content digest); ``replace_dir`` puts it in place. Removed on leaving the block
    unless it was put in place, so an exception leaves nothing behind."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once replace_dir moved it


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` at its sibling ``target`` in one rename, replacing what is there."""
    tmp, target = Path(tmp), Path(target)
    _fsync_dir(tmp)
    with locked(target.parent):
        if target.exists():
            # a unique empty directory that rename(2) may replace: never another process's backup
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    _fsync_dir(target.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename. The file is readable and writable
    by its owner only (``mkstemp``'s mode 600), from its first byte on: fit for secrets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
