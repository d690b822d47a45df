"""Training slots: at most N training tasks at once on this machine, across processes.

Two `lmp run`s (or scheduled runs) that train together would split 2 cores between them and both take
twice as long; a slot makes the second wait instead. Slots are ``flock`` locks on files in the user's
cache directory, so they are shared by every process of this user on this machine whichever Prefect
API each one talks to, and the kernel frees a slot the moment its holder exits — a killed task never
blocks the others. The holder writes its pipeline, pid and start time into the lock file, so a process that
waits can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def lock_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lm-pipelines" / "locks"


@dataclass(frozen=True)
class Holder:
    """Who holds a slot: the pipeline it trains, its process id, and since when (seconds since the epoch)."""

    pipeline: str
    pid: int
    since: float

    def __str__(self) -> str:
        day = time.strftime("%Y-%m-%d", time.localtime(self.since))
        at = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.pipeline} (pid {self.pid}, since {at if day == time.strftime('%Y-%m-%d') else f'{day} {at}'})"


def _slot_file(i: int) -> Path:
    return lock_dir() / f"train-{i}.lock"


def holders(slots: int) -> list[Holder]:
    """The recorded holders of the first ``slots`` slots (read without locking: a slot just taken may not
    have written its record yet, and a free slot may still show its last holder — only call this for held ones)."""
    found = []
    for i in range(slots):
        try:
            record = json.loads(_slot_file(i).read_text())
            found.append(Holder(str(record["pipeline"]), int(record["pid"]), float(record["since"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _waiting_message(slots: int) -> str:
    who = ", ".join(map(str, holders(slots))) or "another process"
    if slots == 1:
        return f"waiting for a training slot held by {who}"
    return f"all {slots} training slots on this machine are busy (held by {who}); waiting for one"


def _claim(f, holder: str) -> None:
    """Record this process as the slot's holder, in the lock file it holds."""
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pipeline": holder, "pid": os.getpid(), "since": time.time()}))
    f.flush()


@contextmanager
def training_slot(slots: int, on_wait=None, holder: str = "lmp") -> Iterator[float]:
    """Hold one of ``slots`` training slots for the block; yields the seconds spent waiting for it.

    ``on_wait(message)`` is called once if every slot is taken, naming who holds them (then this blocks
    until one frees up). ``holder``: the pipeline name recorded for processes that wait on this one.
    """
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    files = [open(_slot_file(i), "a+") for i in range(slots)]  # noqa: SIM115
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
                on_wait(_waiting_message(slots))
            held = files[os.getpid() % slots]
            fcntl.flock(held, fcntl.LOCK_EX)  # blocks; the kernel wakes us when the holder releases or dies
        _claim(held, holder)
        yield time.monotonic() - started
    finally:
        for f in files:
            f.close()  # closing releases the lock
