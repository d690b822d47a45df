"""The Prefect flow: ingest → tokenize → train → evaluate → register, tracked as one MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows import classify, prefect_links, tasks, tracking
from flows.config import ClassifierSpec, PipelineSpec, validate_spec
from flows.resume import prepare_resume, process_tags
from lm.config import flatten
from lm.plan import record_success
from lm.sources import describe
from lm.training import TrainingInterrupted

STAMP = "%Y%m%d-%H%M%S"


def _flow_run_name() -> str:
    """``PIPELINE-<time>`` until ingest knows the data digest (then ``PIPELINE-<digest8>-<time>``)."""
    spec = flow_run.parameters["spec"]
    return f"{spec['name'] if isinstance(spec, dict) else spec.name}-{time.strftime(STAMP)}"


def stopped_message(stop: TrainingInterrupted) -> str:
    """What a stop on request (Ctrl-C, SIGTERM) left and what to do next."""
    where = f", checkpoint {stop.checkpoint}" if stop.checkpoint else ", no checkpoint"
    return f"stopped at step {stop.step}{where}; run again to resume"


@flow(name="lm-pipeline", flow_run_name=_flow_run_name, validate_parameters=False, **tasks.RESULTS)
def lm_pipeline(
    spec: PipelineSpec | ClassifierSpec | dict, workdir: str = ".lmp", base_dir: str = ".", fresh: bool = False
) -> dict:
    """Run one pipeline end to end; returns the run id, metrics, sample and registered version.

    ``workdir`` holds stage outputs and caches; relative data paths are resolved against ``base_dir``.
    An interrupted earlier run of the pipeline is resumed from its newest valid checkpoint into the same
    MLflow run, unless ``fresh``. ``spec`` may be its JSON form (as a deployment stores it).
    """
    spec = validate_spec(spec)
    try:
        return _run(spec, workdir, base_dir, fresh)
    except TrainingInterrupted as stop:
        if isinstance(stop, tracking.TrackingUnavailable):  # the tracking server stayed away: a failure
            raise
        # A stop on request is a cancellation, not a failure. The state carries the exception: the caller of
        # the flow gets it raised as it was (step, checkpoint), and Prefect records the run as Cancelled.
        return Cancelled(message=stopped_message(stop), data=stop)


def _run(spec: PipelineSpec | ClassifierSpec, workdir: str, base_dir: str, fresh: bool) -> dict:
    """The flow's body: one tracked MLflow run around the stages (ended KILLED when training is stopped)."""
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
        prefect_links.link_mlflow_run(spec.name, run_id)
        retry = {"retries": spec.retries, "retry_delay_seconds": spec.retry_delay_seconds}
        if spec.task == "classification":
            result = classify.run(spec, run_id, workdir, base_dir, resume, retry)
            prefect_links.rename_flow_run(str(flow_run.id), f"{spec.name}-{result['data_digest'][:8]}-{stamp}")
            get_run_logger().info("registered %s", result["registered"]["uri"])
            return result
        context = spec.model.context_length
        corpus = tasks.ingest.with_options(**retry)(spec.data, workdir, base_dir, context)
        prefect_links.rename_flow_run(str(flow_run.id), f"{spec.name}-{corpus['digest'][:8]}-{stamp}")
        tokens = tasks.tokenize.with_options(**retry)(corpus, spec.tokenizer, workdir, context)
        if resume is None:
            tracking.log_dataset(run_id, corpus, describe(spec.data))
        tracking.set_tags(run_id, {"data_digest": corpus["digest"], "tokenizer_digest": tokens["tokenizer_digest"]})
        train = tasks.train.with_options(**retry, timeout_seconds=spec.timeout_seconds)
        trained = train(tokens, spec, run_id, workdir, str(resume.checkpoint) if resume else None)
        evaluated = tasks.evaluate.with_options(**retry)(tokens, trained, spec, run_id)
        registered = tasks.register.with_options(**retry)(corpus, tokens, trained, evaluated, spec, run_id, workdir)
        tasks.report.with_options(**retry)(tokens, trained, evaluated, registered, spec, run_id)
        get_run_logger().info("registered %s", registered["uri"])
    record_success(workdir, spec.name, corpus["inputs"], tokens["inputs"])
    return {
        "run_id": run_id,
        "metrics": evaluated["metrics"],
        "sample": evaluated["sample"],
        "registered": registered,
        "train": trained,
        "data_digest": corpus["digest"],
        "stages": {"ingest": corpus["cached"], "tokenize": tokens["cached"]},
        "resumed_from_step": resume.step if resume else None,
    }
