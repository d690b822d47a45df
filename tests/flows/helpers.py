"""Small helpers several flow tests share."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))
"""The `lmp` console script of the environment running the tests."""


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, method: str = "GET", body: dict | None = None, **headers: str) -> tuple[int, dict, str]:
    """One request; its status, headers (lower-case names) and body, whatever the status. A 503 (Prefect's answer
    while its SQLite database is locked by a busy moment) is retried for up to 30 s, as Prefect's own client does."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers} if body is not None else headers
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()
        time.sleep(0.5)  # bounded retry of a retryable answer
