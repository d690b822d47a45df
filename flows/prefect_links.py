"""Cross-links between a Prefect flow run and its MLflow run, and the flow run's name."""

from __future__ import annotations

import os

import mlflow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_UI_URL

TEMPORARY_API = "LMP_TEMPORARY_PREFECT_API"  # set by flows.ops.prefect_server: its UI is off, links would be dead


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when there is a UI to open."""
    ui = PREFECT_UI_URL.value()
    if not ui or os.environ.get(TEMPORARY_API):
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


LMP_UI = "http://127.0.0.1:5000"  # where `lmp ui` serves the embedded store by default


def mlflow_run_url(run_id: str) -> str | None:
    """The MLflow run's page, when the tracking store is a server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return run_page(uri, run_id)


def run_page(ui: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``ui``."""
    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def mlflow_run_link(run_id: str) -> str:
    """Where to look at the run: its page on the tracking server, or on `lmp ui` for the embedded store."""
    return mlflow_run_url(run_id) or f"{run_page(LMP_UI, run_id)} (start `lmp ui` first)"


def link_mlflow_run(pipeline: str, run_id: str) -> None:
    """A Prefect artifact on the flow run pointing at its MLflow run."""
    key = f"{pipeline.replace('.', '-').replace('_', '-')}-mlflow-run"
    if url := mlflow_run_url(run_id):
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key=key, description="the MLflow run")
    else:
        create_markdown_artifact(
            f"MLflow run `{run_id}` in `{mlflow.get_tracking_uri()}`: {mlflow_run_link(run_id)}.",
            key=key,
            description="the MLflow run",
        )


def rename_flow_run(flow_run_id: str, name: str) -> None:
    """Name the flow run after the pipeline and its data digest (known only after ingest)."""
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=name)
