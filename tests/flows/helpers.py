"""Small helpers several flow tests share."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))
"""The `lmp` console script of the environment running the tests."""


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
