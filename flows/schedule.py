"""`lmp schedule`: one Prefect deployment per scheduled pipeline, served from this process.

A deployment carries the pipeline's validated config (with its ``schedule.parameters`` overrides
applied) as the flow's ``spec`` parameter, so a scheduled run is exactly `lmp run PIPELINE` as the file
said when `lmp schedule` started. Schedules need a Prefect server that outlives this process:
``PREFECT_API_URL``, or the servers `lmp up` recorded.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flows import servers
from flows.config import PipelineSpec

TAG = "lm-pipelines"


class ScheduleError(RuntimeError):
    """Scheduling is not possible as asked; the message says what to do."""


def use_servers(workdir: Path) -> dict[str, str]:
    """Point this process (and the runs it starts) at the Prefect API and MLflow server to use."""
    if os.environ.get("PREFECT_API_URL"):
        return {k: os.environ[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if k in os.environ}
    state = servers.running(workdir)
    if state is None:
        raise ScheduleError(
            "schedules need a Prefect server that outlives this command: run `lmp up` first, or set "
            "PREFECT_API_URL (and MLFLOW_TRACKING_URI) to shared servers"
        )
    for key, value in state["env"].items():
        os.environ.setdefault(key, value)
    return dict(state["env"])


def deployments(specs: list[PipelineSpec], workdir: str, base_dir: str) -> list:
    """A RunnerDeployment per spec (each must have a schedule)."""
    from prefect.schedules import Cron, Interval

    from flows.pipeline import lm_pipeline

    out = []
    for spec in specs:
        schedule = spec.schedule
        trigger = (
            Cron(schedule.cron, timezone=schedule.timezone)
            if schedule.cron
            else Interval(timedelta(seconds=schedule.interval), timezone=schedule.timezone)
        )
        out.append(
            lm_pipeline.to_deployment(
                name=spec.name,
                parameters={"spec": spec.scheduled().model_dump(mode="json"), "workdir": workdir, "base_dir": base_dir},
                schedules=[trigger],
                paused=not schedule.active,
                tags=[TAG, spec.name],
                description=spec.description or f"lm-pipelines pipeline {spec.name}",
                enforce_parameter_schema=False,  # the spec was validated by lm-pipelines already
            )
        )
    return out


def listing() -> list[dict]:
    """Every lm-pipelines deployment on the server with its schedule state and next scheduled run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))
        for deployment in found:
            upcoming = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=1,
            )
            schedules = [
                str(getattr(s.schedule, "cron", None) or getattr(s.schedule, "interval", ""))
                for s in deployment.schedules
            ]
            rows.append(
                {
                    "deployment": deployment.name,
                    "schedule": ", ".join(schedules) or "-",
                    "active": not deployment.paused,
                    "next run": upcoming[0].expected_start_time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                    if upcoming
                    else "-",
                }
            )
    return rows


def now() -> datetime:
    return datetime.now(UTC)
