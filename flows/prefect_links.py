"""Cross-links between a Prefect flow run and its MLflow run, and the flow run's name."""

from __future__ import annotations

import os

import mlflow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_UI_URL

TEMPORARY_API = "LMP_TEMPORARY_PREFECT_API"  # set by flows.prefect_server: its UI is off, links would be dead


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when there is a UI to open."""
    ui = PREFECT_UI_URL.value()
    if not ui or os.environ.get(TEMPORARY_API):
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def mlflow_run_url(run_id: str) -> str | None:
    """The MLflow run's page, when the tracking store is a server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def link_mlflow_run(pipeline: str, run_id: str) -> None:
    """A Prefect artifact on the flow run pointing at its MLflow run."""
    key = f"{pipeline.replace('.', '-').replace('_', '-')}-mlflow-run"
    if url := mlflow_run_url(run_id):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=key, description="the MLflow run")
    else:
        create_markdown_artifact(
            f"MLflow run `{run_id}` in `{mlflow.get_tracking_uri()}` (open it with `lmp ui`).",
            key=key,
            description="the MLflow run",
        )


def rename_flow_run(flow_run_id: str, name: str) -> None:
    """Name the flow run after the pipeline and its data digest (known only after ingest)."""
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=name)
