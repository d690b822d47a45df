"""Flow tests run under one session-scoped Prefect test harness and a temporary MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.flows.helpers import build_store, use_store

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def store_dir(prefect_harness, tmp_path_factory):
    """One embedded store with a GPT and an LSTM language model and a genre classifier fine-tuned from the
    GPT (smoke-genre, init_from models:/smoke@champion), each run once; yields its directory. Built against
    its own store whatever an earlier test left in MLflow or MLFLOW_TRACKING_URI."""
    from flows.config import load_pipelines

    shipped = load_pipelines(ROOT / "pipelines.yaml")
    smoke = shipped.get("smoke")
    lstm_model = {"kind": "lstm", "num_layers": 1, "embed_dim": 16, "hidden_dim": 32, "context_length": 32}
    lstm = smoke.overridden({"name": "smoke-lstm", "model": lstm_model})
    path = build_store(tmp_path_factory.mktemp("store"), [smoke, lstm, shipped.get("smoke-genre")])
    yield path


@pytest.fixture
def store(store_dir, monkeypatch):
    """The session's store (see ``store_dir``), with MLflow, MLFLOW_TRACKING_URI and the working directory
    pointing at it for this test; yields its directory."""
    yield use_store(store_dir, monkeypatch)


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """A test that points MLflow at its own store leaves the next test's URIs as they were."""
    import mlflow

    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    exported = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it to child processes too
    yield
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
