"""Flow tests run under one session-scoped Prefect test harness and a temporary MLflow store."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh embedded store under tmp_path; returns the tracking URI."""
    import mlflow

    from flows import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.configure(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)
