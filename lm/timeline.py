"""An opt-in start-up timeline: with ``LMP_TIMELINE=<file>`` set, ``mark(event)`` appends one JSON line
``{"event": ..., "t": <time.time()>, "cpu": <this process's CPU seconds>}`` to that file (``bench/startup.py``
reads it); without it, nothing."""

from __future__ import annotations

import json
import os
import time

_PATH = os.environ.get("LMP_TIMELINE")


def mark(event: str) -> None:
    """Record that ``event`` happened now (only when ``LMP_TIMELINE`` names a file)."""
    if _PATH:
        with open(_PATH, "a", encoding="utf-8") as f:
            record = {"event": event, "t": time.time(), "cpu": time.process_time(), "pid": os.getpid()}
            f.write(json.dumps(record) + "\n")
