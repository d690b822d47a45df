"""Small helpers several flow tests share."""

from __future__ import annotations

import json
import os
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


def build_store(path: Path, specs) -> Path:
    """Run each pipeline spec through the flow into an embedded store at ``path`` (whatever MLflow or
    MLFLOW_TRACKING_URI pointed at before, and restored after); returns ``path``."""
    import mlflow

    from flows import tracking
    from flows.pipeline import lm_pipeline

    cwd, exported = Path.cwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(path)
    tracking.configure_uri(tracking.default_tracking_uri(path))
    try:
        for spec in specs:
            lm_pipeline(spec, workdir=str(path / ".lmp"))
    finally:
        mlflow.set_tracking_uri(None)
        os.chdir(cwd)
        if exported is not None:
            os.environ["MLFLOW_TRACKING_URI"] = exported
    return path


def use_store(path: Path, monkeypatch) -> Path:
    """Point MLflow, MLFLOW_TRACKING_URI and the working directory at the store ``path`` for one test."""
    from flows import tracking

    uri = tracking.default_tracking_uri(path)
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure_uri(uri)
    return path
