"""A refused login named in one line, and what `lmp up` refuses or keeps before any server starts."""

from __future__ import annotations

import json

import httpx
import pytest
from mlflow.exceptions import MlflowException

from flows.ops import servers
from flows.ops.credentials import refusal


def test_an_mlflow_401_names_the_tracking_server_and_the_account(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://198.18.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    error = MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 401 != 200.")
    try:
        raise RuntimeError("the flow failed") from error
    except RuntimeError as wrapped:
        message = refusal(wrapped)
    assert message.startswith("the MLflow server at http://198.18.0.1:5000 refused the account 'alice' (HTTP 401)")
    assert "MLFLOW_TRACKING_PASSWORD" in message


def test_a_prefect_401_names_the_api_and_what_to_set(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://198.18.0.1:4200/api")
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    request = httpx.Request("GET", "http://198.18.0.1:4200/api/admin/version")
    error = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))
    message = refusal(error)
    expected = "the Prefect server at http://198.18.0.1:4200/api refused a request without an auth string (HTTP 401)"
    assert message.startswith(expected)
    assert "PREFECT_API_AUTH_STRING" in message


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), MlflowException("failed with error code 500 != 200"), ValueError("error code 401")],
)
def test_other_errors_are_not_taken_for_a_refused_login(error):
    assert refusal(error) is None


def test_up_refuses_an_address_beyond_loopback_without_logins(tmp_path):
    with pytest.raises(servers.ServersError, match="--backend postgresql"):
        servers.up(tmp_path, tmp_path / ".lmp", 4200, 5000, host="198.18.0.1")
    assert not (tmp_path / ".lmp").exists()  # refused before anything was written or started


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_up_refuses_a_wildcard_address_it_could_not_hand_to_clients(tmp_path, wildcard):
    with pytest.raises(servers.ServersError, match="names no address"):
        servers.up(tmp_path, tmp_path / ".lmp", 4200, 5000, backend="postgresql", host=wildcard)
    assert not (tmp_path / ".lmp").exists()


def test_secrets_are_made_once_private_and_kept(tmp_path):
    made = servers.secrets(tmp_path)
    path = tmp_path / servers.SECRETS
    assert path.stat().st_mode & 0o777 == 0o600
    assert servers.secrets(tmp_path) == made == json.loads(path.read_text())
    assert made["prefect_auth_string"].startswith("admin:") and len(made["postgres_password"]) >= 24


def test_a_cluster_without_its_secrets_is_refused_not_replaced(tmp_path):
    (tmp_path / "postgres" / "data").mkdir(parents=True)
    with pytest.raises(servers.ServersError, match="secrets.json is missing"):
        servers.secrets(tmp_path)
    assert not (tmp_path / servers.SECRETS).exists()
