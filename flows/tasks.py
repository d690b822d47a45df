"""Thin Prefect tasks around the pipeline's task (``lm.tasks``): the same tasks for every task, typed results
(``lm.results``: paths, digests, metrics) in and out.

Stage outputs are content-addressed directories under the work directory, so an unchanged stage
reuses what is already on disk. Prefect's own result caching is off: results are small and recomputed
cheaply, and nothing is pickled (``RESULTS``: not persisted; a failure's record is JSON).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from flows import resume as resume_mod
from flows import torchrun, tracking
from flows.config import AnySpec
from flows.ops import machine, slots
from flows.registry import promotion
from flows.registry import register as registry
from flows.registry import reports as reporting
from flows.registry.register import Registered
from flows.registry.samples import GateCard
from lm import tasks as lm_tasks
from lm.checkpoint import STEP_PREFIX, latest_checkpoint
from lm.errors import DataError
from lm.results import Encoded, Evaluation, Init, Prepared, Trained
from lm.runtime import resolve_runtime
from lm.training import TrainingError, TrainingInterrupted


def transient(task, task_run, state) -> bool:
    """Retry a task on unexpected errors (I/O, network, memory, a dying worker), not on bad input, a stop
    request, a refused resume or a non-finite loss, which a retry would only repeat."""
    try:
        state.result()
    except (TrainingInterrupted, TrainingError, DataError, KeyboardInterrupt):
        return False
    except Exception:
        return True
    return False


# Prefect writes a failed run's exception to its result storage whatever ``persist_result`` says, with
# its default serializer (pickle, base64 in ~/.prefect/storage): JSON keeps it a readable record instead.
RESULTS = {"persist_result": False, "result_serializer": "json"}
OPTS = {"cache_policy": NONE, "retry_condition_fn": transient, **RESULTS}


def task_of(spec):
    """The spec's task (``lm.tasks``): the one object every stage below asks what to do."""
    return lm_tasks.of(spec)


def _report(stage: str, result: Prepared | Encoded) -> None:
    """One line per stage saying whether it was cached, plus any warnings about the input."""
    log = get_run_logger()
    state = "cached" if result.cached else "built"
    digest = result.digest if isinstance(result, Prepared) else result.key
    log.info("%s: %s, digest %s… %s", stage, state, digest[:12], result.sizes())
    for skipped in getattr(result, "skipped", ()):
        log.warning("%s: %s", stage, skipped)
    if getattr(result, "replaced_chars", 0):
        log.warning("%s: replaced %d undecodable byte sequences with U+FFFD", stage, result.replaced_chars)


@task(name="init-model", **OPTS)
def init_model(spec: AnySpec, workdir: str) -> Init:
    """Resolve and download the registered model the pipeline starts from (reused when already here)."""
    task = task_of(spec)
    init = registry.init_model(task.init_from(), Path(workdir) / "init")
    parts = {role: registry.init_model(uri, Path(workdir) / "init") for role, uri in task.init_parts().items()}
    init = init.model_copy(update={"parts": parts}) if parts else init
    task.check_init(init)
    for each in [init, *parts.values()]:
        where = f"version {each.version} (run {each.run_id})" if each.run_id else each.uri
        get_run_logger().info("init: %s is %s", each.requested, where)
    return init


@task(name="ingest", **OPTS)
def ingest(spec: AnySpec, workdir: str, base_dir: str) -> Prepared:
    task = task_of(spec)
    prepared = task.prepare(Path(workdir) / task.data_root, base_dir=Path(base_dir))
    _report("ingest", prepared)
    return prepared


@task(name="tokenize", **OPTS)
def tokenize(spec: AnySpec, prepared: Prepared, init: Init | None, workdir: str) -> Encoded:
    task = task_of(spec)
    encoded = task.encode(prepared, init, Path(workdir) / task.tokens_root)
    _report("tokenize", encoded)
    return encoded


@task(name="train", **OPTS)
def train(spec: AnySpec, encoded: Encoded, init: Init | None, run_id: str, workdir: str,
          resume_from: str | None = None) -> Trained:  # fmt: skip
    """Train, or continue from the newest valid checkpoint of this run: after an interrupted ``lmp run``
    (``resume_from``) or when Prefect retries this task after a failure. When this run's training already
    finished (a failure came later), return its recorded result without training again."""
    log = get_run_logger()
    out = Path(workdir) / "runs" / run_id
    inputs = resume_mod.training_inputs(encoded, init)
    if (record := resume_mod.read_trained(out)) is not None:
        return _finished(record, inputs, spec, run_id, log)
    resume, rejected = latest_checkpoint(out) if out.exists() else (None, [])
    for reason in rejected:
        log.warning("not resuming from a damaged checkpoint: %s", reason)
    if resume is None and resume_from and Path(resume_from).name.startswith(STEP_PREFIX):
        resume = Path(resume_from)
    if resume is not None:
        log.info("train: resuming from %s (attempt %d)", resume, task_run.run_count)
        tracking.set_tags(run_id, {"lmp.resumed_from_step": resume.name.split("-")[-1].lstrip("0") or "0"})
    replaying = resume is not None or task_run.run_count > 1  # steps already in MLflow are not logged again
    with slots.training_slot(spec.training_slots, on_wait=log.warning, holder=spec.name) as waited:
        if waited > 0.5:
            log.info("train: got a training slot after %.1f s", waited)
        tracking.log_metrics(run_id, {"train_slot_wait_seconds": waited}, step=0)
        trained = _fit(spec, encoded, init, run_id, out, resume, replaying, log)
    # Recorded before anything else can fail: from now on a rerun evaluates final/ instead of training again.
    resume_mod.record_trained(out, resume_mod.spec_settings(spec), inputs, trained)
    tracking.log_metrics(run_id, _summary(trained), step=trained.steps)
    if trained.stopped_early:
        log.info("train: stopped early at step %d; kept the weights of step %d", trained.steps, trained.best_step)
        tracking.set_tags(run_id, {"lmp.stopped_early_at": str(trained.steps)})
    return trained


def _fit(spec: AnySpec, encoded: Encoded, init: Init | None, run_id: str, out: Path, resume, replaying: bool,
         log) -> Trained:  # fmt: skip
    """The task's ``fit`` in this process, or on ``train.distributed``'s torchrun ranks."""
    log_card = None if resume else (lambda card: tracking.log_params(run_id, card))  # params are write-once
    runtime = resolve_runtime(spec.train)
    peak = machine.peak_flops(runtime.device, runtime.amp_dtype)
    tracking.set_tags(run_id, {"lmp.peak_gflops": f"{peak / 1e9:.1f}"})
    if spec.train.distributed is not None and spec.train.distributed.world_size > 1:
        job = torchrun.Job(
            spec=spec.model_dump(mode="json"), encoded=encoded.model_dump(mode="json"),
            init=init.model_dump(mode="json") if init else None, run_id=run_id, out=str(out),
            resume_from=str(resume) if resume else None, replaying=replaying, peak_flops=peak,
            tracking_uri=mlflow.get_tracking_uri(),
        )  # fmt: skip
        with resume_mod.STOP.handling():
            return torchrun.run(spec, job, out, should_stop=resume_mod.STOP.requested, log=log)
    with tracking.MetricSink(run_id, resuming=replaying, buffer_dir=out) as sink, resume_mod.STOP.handling():
        return task_of(spec).fit(
            encoded,
            init,
            out,
            on_metrics=sink,
            on_start=log_card,
            resume_from=resume,
            before_checkpoint=lambda step: sink.flush(),  # metrics up to a checkpoint are durable before it
            should_stop=lambda: resume_mod.STOP.requested() or sink.should_stop(),  # or tracking stayed away
            peak_flops=peak,
        )


def _summary(trained: Trained) -> dict[str, float]:
    """The training run's summary metrics, logged at its last step."""
    summary = {"wall_seconds": trained.wall_seconds, "tokens_per_second": trained.tokens_per_second}
    if trained.best_step is not None:
        summary["best_step"] = trained.best_step
    return summary


def _finished(record: dict, inputs: dict, spec: AnySpec, run_id: str, log) -> Trained:
    """This run's training finished before (a failure or stop came after it): check it was made with these
    settings and inputs, log whatever of its summary did not reach MLflow, and return its result."""
    changed = resume_mod.trained_changes(record, resume_mod.spec_settings(spec), inputs)
    if changed:
        raise resume_mod.refuse_changed(run_id, changed)
    trained = Trained.model_validate(record["result"])
    log.info("train: training finished at step %d before; evaluating %s", trained.steps, trained.checkpoint)
    log_new(run_id, _summary(trained), trained.steps)
    if trained.stopped_early:
        tracking.set_tags(run_id, {"lmp.stopped_early_at": str(trained.steps)})
    return trained


def log_new(run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log the rows the run does not already hold at ``step`` with the same value: an attempt that repeats
    work an earlier one logged (a rerun after a failure) adds no duplicates, while a changed value is logged."""
    client = MlflowClient()
    present = client.get_run(run_id).data.metrics

    def logged(key: str, value: float) -> bool:
        same = (lambda v: math.isnan(v)) if math.isnan(value) else (lambda v: v == value)
        return key in present and any(m.step == step and same(m.value) for m in client.get_metric_history(run_id, key))

    new = {k: v for k, v in metrics.items() if not logged(k, float(v))}
    if new:
        tracking.log_metrics(run_id, new, step=step)


@task(name="evaluate", **OPTS)
def evaluate(spec: AnySpec, encoded: Encoded, trained: Trained, init: Init | None, run_id: str) -> Evaluation:
    evaluation = task_of(spec).evaluate(encoded, trained, init)
    log_new(run_id, evaluation.metrics, trained.steps)  # a rerun after a later failure: no duplicate rows
    reporting.log_evaluation(run_id, evaluation)
    return evaluation


@task(name="register", **OPTS)
def register(spec: AnySpec, prepared: Prepared, encoded: Encoded, trained: Trained, evaluation: Evaluation,
             init: Init | None, run_id: str, workdir: str) -> Registered:  # fmt: skip
    """Register the model (@challenger) and run the promotion gate against @champion on this run's data
    (the champion re-evaluated on it when the data differ), and log the verdict."""
    task = task_of(spec)
    package = task.export(encoded, trained, init, Path(workdir) / "runs" / run_id / "export")
    tags = {
        "data_digest": encoded.data_digest,
        "tokenizer_digest": encoded.tokenizer_digest,
        "config_digest": spec.digest(),
        "git_commit": registry.git_commit(),
        **task.lineage_tags(init),
        **task.version_tags(evaluation),
    }
    scratch = Path(workdir) / "runs" / run_id
    evaluate_champion = registry.champion_evaluator(spec, Path(prepared.path), scratch)
    registered = registry.log_and_register(
        run_id, spec.name, package, tags, task.served(evaluation, trained, encoded), promote=spec.promote,
        evaluate_champion=evaluate_champion,
        gate_card=lambda version: GateCard(spec, Path(prepared.path), scratch, run_id, package, version),
    )  # fmt: skip
    if registered.decision:
        verdict = promotion.verdict(registered.decision, registered.version, created=registered.created)
        said = verdict if verdict.startswith("version") else f"version {registered.version} {verdict}"
        get_run_logger().info("gate: %s", said)
    if spec.export and registered.created:
        from flows.registry.export import export_registered

        root = Path(workdir) / "runs" / run_id / "exported"
        for fmt, done in export_registered(run_id, package, spec.export, spec.name, registered.version, root).items():
            get_run_logger().info("export: %s → %s (%s)", fmt, done["artifact_uri"], done.get("architecture", fmt))
    return registered


@task(name="report", **OPTS)
def report(spec: AnySpec, encoded: Encoded, trained: Trained, evaluation: Evaluation, registered: Registered,
           init: Init | None, run_id: str) -> str:  # fmt: skip
    """Loss curve, model card and the task's tables in MLflow and as Prefect artifacts."""
    card = task_of(spec).card(encoded, trained, evaluation, init)
    return reporting.publish(spec, run_id, card, trained, evaluation, registered)
