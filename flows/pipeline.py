"""The Prefect flow: ingest → tokenize → train → evaluate → register, tracked as one MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows import prefect_links, prewarm, tasks, tracking
from flows.config import AnySpec, validate_spec
from flows.registry import verify as verification
from flows.resume import prepare_resume, process_tags
from lm.config import flatten
from lm.plan import record_success
from lm.timeline import mark
from lm.training import TrainingInterrupted

STAMP = "%Y%m%d-%H%M%S"
mark("imports")  # `lmp run` imports this module last of its heavy ones


def _flow_run_name() -> str:
    """``PIPELINE-<time>`` until ingest knows the data digest (then ``PIPELINE-<digest8>-<time>``)."""
    spec = flow_run.parameters["spec"]
    return f"{spec['name'] if isinstance(spec, dict) else spec.name}-{time.strftime(STAMP)}"


def stopped_message(stop: TrainingInterrupted) -> str:
    """What a stop on request (Ctrl-C, SIGTERM) left and what to do next."""
    where = f", checkpoint {stop.checkpoint}" if stop.checkpoint else ", no checkpoint"
    return f"stopped at step {stop.step}{where}; run again to resume"


@flow(name="lm-pipeline", flow_run_name=_flow_run_name, validate_parameters=False, **tasks.RESULTS)
def lm_pipeline(spec: AnySpec | dict, workdir: str = ".lmp", base_dir: str = ".", fresh: bool = False) -> dict:
    """Run one pipeline end to end; returns the run id, metrics, sample and registered version.

    ``workdir`` holds stage outputs and caches; relative data paths are resolved against ``base_dir``.
    An interrupted earlier run of the pipeline is resumed from its newest valid checkpoint into the same
    MLflow run, unless ``fresh``. ``spec`` may be its JSON form (as a deployment stores it).
    """
    mark("flow_start")
    spec = validate_spec(spec)
    try:
        return _run(spec, workdir, base_dir, fresh)
    except TrainingInterrupted as stop:
        if isinstance(stop, tracking.TrackingUnavailable):  # the tracking server stayed away: a failure
            raise
        # A stop on request is a cancellation, not a failure. The state carries the exception: the caller of
        # the flow gets it raised as it was (step, checkpoint), and Prefect records the run as Cancelled.
        return Cancelled(message=stopped_message(stop), data=stop)


def _run(spec: AnySpec, workdir: str, base_dir: str, fresh: bool) -> dict:
    """The flow's body, the same for every task: one tracked MLflow run around the stages (ended KILLED when
    training is stopped). The task (``lm.tasks``) decides what each stage does."""
    task = tasks.task_of(spec)
    tracking.configure(Path(base_dir))  # MLFLOW_TRACKING_URI, else the embedded store under base_dir
    resume = prepare_resume(spec, workdir, fresh)
    tags = {"pipeline": spec.name, "config_digest": spec.digest(), "prefect.flow_run_id": str(flow_run.id)}
    if url := prefect_links.flow_run_url(str(flow_run.id)):
        tags["prefect.flow_run_url"] = url
    tags |= process_tags() | ({"lmp.resumed_from_step": str(resume.step)} if resume else {})
    stamp = time.strftime(STAMP)
    run_name = f"{spec.name}-{stamp}"  # one naming scheme for every pipeline
    with tracking.tracked_run(
        spec.name, run_name, tags, resume and resume.run_id, description=spec.description, base_dir=base_dir
    ) as run_id:
        if resume is None:
            tracking.log_params(run_id, flatten(spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)))
            verification.record(run_id, spec)  # the spec and this machine, for `lmp verify`
        prefect_links.link_mlflow_run(spec.name, run_id)
        retry = {"retries": spec.retries, "retry_delay_seconds": spec.retry_delay_seconds}
        mark("first_task")
        init = tasks.init_model.with_options(**retry)(spec, workdir) if task.init_from() else None
        tracking.set_tags(run_id, task.lineage_tags(init))
        prepared = tasks.ingest.with_options(**retry)(spec, workdir, base_dir)
        prefect_links.rename_flow_run(str(flow_run.id), f"{spec.name}-{prepared.digest[:8]}-{stamp}")
        encoded = tasks.tokenize.with_options(**retry)(spec, prepared, init, workdir)
        if resume is None:
            tracking.log_params(run_id, task.params(encoded, init))
            tracking.log_dataset(run_id, task.dataset(prepared))
        tracking.set_tags(run_id, {"data_digest": prepared.digest, "tokenizer_digest": encoded.tokenizer_digest})
        train = tasks.train.with_options(**retry, timeout_seconds=spec.timeout_seconds)
        distributed = spec.train.distributed is not None and spec.train.distributed.world_size > 1
        with prewarm.during_training(distributed):  # the report's matplotlib import, overlapped
            trained = train(spec, encoded, init, run_id, workdir, str(resume.checkpoint) if resume else None)
        mark("trained")
        evaluation = tasks.evaluate.with_options(**retry)(spec, encoded, trained, init, run_id)
        mark("evaluated")
        registered = tasks.register.with_options(**retry)(
            spec, prepared, encoded, trained, evaluation, init, run_id, workdir
        )
        mark("registered")
        tasks.report.with_options(**retry)(spec, encoded, trained, evaluation, registered, init, run_id)
        mark("reported")
        get_run_logger().info("registered %s", registered.uri)
    record_success(workdir, spec.name, prepared.inputs, encoded.inputs)
    mark("flow_end")
    return {
        "run_id": run_id,
        "metrics": evaluation.metrics,
        "summary_metrics": list(task.summary_metrics),
        "sample": evaluation.summary,
        "registered": registered.model_dump(),
        "train": trained.model_dump(),
        "data_digest": prepared.digest,
        "stages": {"ingest": prepared.cached, "tokenize": encoded.cached},
        "resumed_from_step": resume.step if resume else None,
        "init": init.model_dump() if init else None,
    }
