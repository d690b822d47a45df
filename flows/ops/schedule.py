"""`lmp schedule`: one Prefect deployment per scheduled pipeline, served from this process.

A deployment carries the pipeline's NAME (its only parameter) and runs ``scheduled_pipeline``, which re-reads
the pipelines file when the run starts, applies the pipeline's own ``schedule.parameters`` and then runs it
like `lmp run PIPELINE`. Anyone who can reach the Prefect API can start a run of a deployment with other
parameters, so what a run may be asked is narrow: ``overrides`` of the keys in ``allowed_overrides`` (the
pipeline's own ``schedule.parameters`` keys and ``SCHEDULE_KEYS``, never data, paths, the gate or
distributed settings), validated like the file. Anything else — an unknown key, a ``spec``, another
pipeline — fails the run with a one-line reason before anything is read or trained. The deployment
enforces its parameter schema too, so Prefect refuses most such requests when they are made.

Where the file, the work directory and the project are is fixed by `lmp schedule` (``run_context_env``,
inherited by the runs it starts), never a run parameter. Schedules need a Prefect server that outlives this
process (``flows.ops.servers.use``), chosen before this module imports Prefect.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.utilities.callables import ParameterSchema
from pydantic import ValidationError

from flows import tasks
from flows.config import ClassifierSpec, ConfigError, PipelineSpec, Seq2SeqSpec, load_pipelines

TAG = "lm-pipelines"
SCHEDULE_KEYS = ("train.max_steps",)
"""Keys any scheduled run may override, besides its pipeline's own `schedule.parameters` keys."""
OVERRIDABLE = ("train.", "model.", "eval.", "head.", "tokenizer.")
"""Sections a run's overrides may touch at all: how a model is built and trained, not what it reads."""
NEVER = ("train.distributed.",)
"""Never overridable by a run (a rendezvous address is a network destination)."""
CONTEXT = {"config": "LMP_SCHEDULE_CONFIG", "workdir": "LMP_SCHEDULE_WORKDIR", "base_dir": "LMP_SCHEDULE_BASE_DIR"}

Scalar = bool | int | float | str


class Refused(ValueError):
    """A scheduled run asked for something a scheduled run may not do; the message says what and what may."""


def run_context_env(config: Path, workdir: Path, base_dir: Path) -> dict[str, str]:
    """The environment that tells the runs `lmp schedule` serves which file, work directory and project to use
    (as `lmp run` passes them: relative paths are read in the runs' working directory, the same as here)."""
    return {CONTEXT["config"]: str(config), CONTEXT["workdir"]: str(workdir), CONTEXT["base_dir"]: str(base_dir)}


def _run_context() -> dict[str, str]:
    defaults = {"config": "pipelines.yaml", "workdir": ".lmp", "base_dir": str(Path.cwd())}
    return {key: os.environ.get(variable) or defaults[key] for key, variable in CONTEXT.items()}


def _overridable(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return key.startswith(OVERRIDABLE) and not key.startswith(NEVER) and "path" not in leaf and "outside" not in leaf


def allowed_overrides(spec: PipelineSpec | ClassifierSpec | Seq2SeqSpec) -> tuple[str, ...]:
    """The dotted keys a scheduled run of ``spec`` may override (sorted)."""
    own = spec.schedule.parameters if spec.schedule is not None else {}
    return tuple(sorted(key for key in {*own, *SCHEDULE_KEYS} if _overridable(key)))


def resolve(
    pipeline: str, overrides: dict, config: Path | str, deployment: str | None = None
) -> PipelineSpec | ClassifierSpec | Seq2SeqSpec:
    """The spec a scheduled run of ``pipeline`` with ``overrides`` runs, read from ``config`` now; raises Refused."""
    if deployment is not None and deployment != pipeline:
        raise Refused(f"deployment {deployment!r} runs pipeline {deployment!r} only, not {pipeline!r}")
    try:
        file = load_pipelines(config)
    except ConfigError as e:
        raise Refused(" ".join(str(e).split())) from None
    if pipeline not in file.pipelines:
        raise Refused(f"no pipeline named {pipeline!r} in {config}")
    spec = file.pipelines[pipeline]
    if spec.schedule is None:
        raise Refused(f"pipeline {pipeline!r} has no `schedule:` in {config} any more")
    allowed = allowed_overrides(spec)
    if not isinstance(overrides, dict):
        raise Refused(f"overrides must map dotted keys to values, not {type(overrides).__name__}")
    for key, value in overrides.items():
        if key not in allowed:
            raise Refused(f"override {key!r} is not allowed for scheduled runs; allowed: {', '.join(allowed)}")
        if not isinstance(value, Scalar):
            raise Refused(f"override {key!r} must be a number, string or boolean, not {type(value).__name__}")
    try:
        return spec.scheduled().overridden(overrides)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise Refused(f"override values make an invalid pipeline: {where}") from None


def _run_pipeline(spec: PipelineSpec | ClassifierSpec | Seq2SeqSpec, workdir: str, base_dir: str) -> dict:
    """The pipeline's flow body, run inside this flow run (one flow run per scheduled run, named as `lmp run`'s)."""
    from flows.pipeline import lm_pipeline

    return lm_pipeline.fn(spec, workdir=workdir, base_dir=base_dir)


@flow(name="lm-pipeline", flow_run_name="{pipeline}", **tasks.RESULTS)
def scheduled_pipeline(pipeline: str, overrides: dict[str, Scalar] | None = None):
    """Run the named scheduled pipeline as the pipelines file says now, with allow-listed ``overrides``;
    refuse (a failed run, its reason logged) anything else."""
    from prefect.runtime import deployment

    context = _run_context()
    try:
        spec = resolve(pipeline, overrides or {}, context["config"], deployment.name)
    except Refused as e:
        get_run_logger().error("refused: %s", e)
        return Failed(message=f"refused: {e}")
    return _run_pipeline(spec, context["workdir"], context["base_dir"])


class ClosedSchema(ParameterSchema):
    """A flow's parameter schema that refuses parameters the flow does not take (Prefect's own allows them)."""

    additionalProperties: bool = False


def _closed_schema(deployment):
    """``deployment`` with a closed parameter schema (what apply() sends; Prefect 3.9 has no option for it —
    tests/flows/ops/test_servers.py checks the server answers 409 to a `spec`)."""
    open_schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    deployment._parameter_openapi_schema = ClosedSchema(**open_schema, additionalProperties=False)
    return deployment


def deployments(specs: list[PipelineSpec | ClassifierSpec | Seq2SeqSpec]) -> list:
    """A RunnerDeployment per spec (each must have a schedule): its pipeline's name is its only parameter, and
    Prefect refuses a run with other parameters (another name, a `spec`, an ill-typed override) when it is made."""
    from prefect.schedules import Cron, Interval
    from prefect.utilities.annotations import freeze

    out = []
    for spec in specs:
        schedule = spec.schedule
        trigger = (
            Cron(schedule.cron, timezone=schedule.timezone)
            if schedule.cron
            else Interval(timedelta(seconds=schedule.interval), timezone=schedule.timezone)
        )
        deployment = scheduled_pipeline.to_deployment(
            name=spec.name,
            parameters={"pipeline": freeze(spec.name)},  # the schema's only allowed value
            schedules=[trigger],
            paused=not schedule.active,
            tags=[TAG, spec.name],
            description=spec.description or f"lm-pipelines pipeline {spec.name}",
            enforce_parameter_schema=True,
        )
        out.append(_closed_schema(deployment))
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
