"""Training slots: at most N training tasks at once on this machine, across processes.

Two `lmp run`s (or scheduled runs) that train together would split 2 cores between them and both take
twice as long; a slot makes the second wait instead. Slots are ``flock`` locks on files in the user's
cache directory, so they are shared by every process of this user on this machine whichever Prefect
API each one talks to, and the kernel frees a slot the moment its holder exits — a killed task never
blocks the others.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lm-pipelines" / "locks"


@contextmanager
def training_slot(slots: int, on_wait=None) -> Iterator[float]:
    """Hold one of ``slots`` training slots for the block; yields the seconds spent waiting for it.

    ``on_wait(message)`` is called once if every slot is taken (then this blocks until one frees up).
    """
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    files = [open(directory / f"train-{i}.lock", "a+") for i in range(slots)]  # noqa: SIM115
    started, held = time.monotonic(), None
    try:
        for f in files:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = f
                break
            except BlockingIOError:
                continue
        if held is None:
            if on_wait is not None:
                on_wait(f"all {slots} training slot(s) on this machine are busy; waiting for one")
            held = files[os.getpid() % slots]
            fcntl.flock(held, fcntl.LOCK_EX)  # blocks; the kernel wakes us when the holder releases or dies
        yield time.monotonic() - started
    finally:
        for f in files:
            f.close()  # closing releases the lock
