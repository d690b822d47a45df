"""Thin Prefect tasks around ``lm.stages``: small values in and out (paths, digests, ids, metrics).

Stage outputs are content-addressed directories under the work directory, so an unchanged stage
reuses what is already on disk. Prefect's own result caching is off: results are small dicts
recomputed cheaply, and nothing is pickled (``RESULTS``: not persisted; a failure's record is JSON).
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
from flows.config import PipelineSpec
from flows.ops import machine, slots
from flows.registry import promotion
from flows.registry import register as registry
from flows.registry import reports as reporting
from lm import stages
from lm.checkpoint import STEP_PREFIX, latest_checkpoint
from lm.config import DataConfig, TokenizerConfig
from lm.errors import DataError
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


def _report(stage: str, result: dict) -> None:
    """One line per stage saying whether it was cached, plus any warnings about the input."""
    log = get_run_logger()
    digest = result.get("digest") or result.get("key")
    state = "cached" if result.get("cached") else "built"
    sizes = result.get("tokens") or {"documents": result.get("documents"), "chars": result.get("chars")}
    log.info("%s: %s, digest %s… %s", stage, state, digest[:12], sizes)
    for skipped in result.get("skipped") or []:
        log.warning("%s: %s", stage, skipped)
    if result.get("replaced_chars"):
        log.warning("%s: replaced %d undecodable byte sequences with U+FFFD", stage, result["replaced_chars"])


@task(name="ingest", **OPTS)
def ingest(data: DataConfig, workdir: str, base_dir: str, context_length: int) -> dict:
    corpus = stages.ingest(data, Path(workdir) / "data", base_dir=Path(base_dir), context_length=context_length)
    _report("ingest", corpus)
    return corpus


@task(name="tokenize", **OPTS)
def tokenize(corpus: dict, tokenizer: TokenizerConfig, workdir: str, context_length: int) -> dict:
    tokens = stages.tokenize(corpus, tokenizer, Path(workdir) / "tokens", context_length=context_length)
    _report("tokenize", tokens)
    return tokens


@task(name="train", **OPTS)
def train(tokens: dict, spec: PipelineSpec, run_id: str, workdir: str, resume_from: str | None = None) -> dict:
    """Train, or continue from the newest valid checkpoint of this run: after an interrupted ``lmp run``
    (``resume_from``) or when Prefect retries this task after a failure. When this run's training already
    finished (a failure came later), return its recorded result without training again."""
    log = get_run_logger()
    out = Path(workdir) / "runs" / run_id
    if (trained := resume_mod.read_trained(out)) is not None:
        return _finished(trained, tokens, spec, run_id, log)
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
        return _fit(tokens, spec, run_id, out, resume, replaying, log)


def _fit(tokens: dict, spec: PipelineSpec, run_id: str, out: Path, resume, replaying: bool, log) -> dict:
    log_card = None if resume else (lambda card: tracking.log_params(run_id, card))  # params are write-once
    runtime = resolve_runtime(spec.train)
    peak = machine.peak_flops(runtime.device, runtime.amp_dtype)
    tracking.set_tags(run_id, {"lmp.peak_gflops": f"{peak / 1e9:.1f}"})
    if spec.train.distributed is not None and spec.train.distributed.world_size > 1:
        job = {
            "spec": spec.model_dump(mode="json"),
            "tokens": tokens,
            "run_id": run_id,
            "out": str(out),
            "resume_from": str(resume) if resume else None,
            "replaying": replaying,
            "peak_flops": peak,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        with resume_mod.STOP.handling():
            result = torchrun.run(spec, job, out, should_stop=resume_mod.STOP.requested, log=log)
    else:
        with tracking.MetricSink(run_id, resuming=replaying, buffer_dir=out) as sink, resume_mod.STOP.handling():
            result = torchrun.fit_stage(
                spec,
                tokens,
                out,
                on_metrics=sink,
                on_start=log_card,
                resume_from=resume,
                before_checkpoint=lambda step: sink.flush(),  # metrics up to a checkpoint are durable before it
                should_stop=lambda: resume_mod.STOP.requested() or sink.should_stop(),  # or tracking stayed away
                peak_flops=peak,
            )
    # Recorded before anything else can fail: from now on a rerun evaluates final/ instead of training again.
    resume_mod.record_trained(out, resume_mod.spec_settings(spec), resume_mod.training_inputs(tokens), result)
    tracking.log_metrics(run_id, _summary(result), step=result["steps"])
    if result["stopped_early"]:
        log.info("train: stopped early at step %d; kept the weights of step %d", result["steps"], result["best_step"])
        tracking.set_tags(run_id, {"lmp.stopped_early_at": str(result["steps"])})
    return result


def _summary(result: dict) -> dict[str, float]:
    """The training run's summary metrics, logged at its last step."""
    summary = {"wall_seconds": result["wall_seconds"], "tokens_per_second": result["tokens_per_second"]}
    if result["best_step"] is not None:
        summary["best_step"] = result["best_step"]
    return summary


def _finished(trained: dict, tokens: dict, spec: PipelineSpec, run_id: str, log) -> dict:
    """This run's training finished before (a failure or stop came after it): check it was made with these
    settings and inputs, log whatever of its summary did not reach MLflow, and return its result."""
    changed = resume_mod.trained_changes(trained, resume_mod.spec_settings(spec), resume_mod.training_inputs(tokens))
    if changed:
        raise resume_mod.refuse_changed(run_id, changed)
    result = trained["result"]
    log.info("train: training finished at step %d before; evaluating %s", result["steps"], result["checkpoint"])
    log_new(run_id, _summary(result), result["steps"])
    if result["stopped_early"]:
        tracking.set_tags(run_id, {"lmp.stopped_early_at": str(result["steps"])})
    return result


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
def evaluate(tokens: dict, trained: dict, spec: PipelineSpec, run_id: str) -> dict:
    result = stages.evaluate(tokens, trained["checkpoint"], spec.model, spec.train, spec.eval)
    log_new(run_id, result["metrics"], trained["steps"])  # a rerun after a later failure: no duplicate rows
    tracking.log_evaluation(run_id, result | {"metrics": {}}, step=trained["steps"])
    return result


@task(name="register", **OPTS)
def register(
    corpus: dict, tokens: dict, trained: dict, evaluated: dict, spec: PipelineSpec, run_id: str, workdir: str
) -> dict:
    """Register the model (@challenger) and run the promotion gate against @champion on this run's data."""
    files = stages.export_model(
        trained["checkpoint"], tokens, spec.model, spec.eval, Path(workdir) / "runs" / run_id / "export"
    )
    metrics = {k: f"{v:.6g}" for k, v in evaluated["metrics"].items()}
    return register_model(
        spec, run_id, files, tokens, metrics, spec.eval.prompt, Path(corpus["path"]), workdir,
        objective=trained["objective"], width=trained["feature_dim"],
    )  # fmt: skip


def register_model(spec, run_id: str, files: dict, tokens: dict, tags: dict, example: str, data_path: Path,
                   workdir: str, **package) -> dict:  # fmt: skip
    """Log and register a run's package (``package``: how it is served — objective, width, labels) with the
    provenance tags every version carries, run the gate with the champion re-evaluated on ``data_path`` when
    the data differ, and log the verdict."""
    tags = {
        "data_digest": tokens["data_digest"],
        "tokenizer_digest": tokens["tokenizer_digest"],
        "config_digest": spec.digest(),
        "git_commit": registry.git_commit(),
        **tags,
    }
    evaluate_champion = registry.champion_evaluator(spec, data_path, Path(workdir) / "runs" / run_id)
    result = registry.log_and_register(
        run_id, spec.name, files, tags, example, promote=spec.promote, evaluate_champion=evaluate_champion, **package
    )
    if result["decision"]:
        verdict = promotion.verdict(result["decision"], result["version"], created=result.get("created", True))
        said = verdict if verdict.startswith("version") else f"version {result['version']} {verdict}"
        get_run_logger().info("gate: %s", said)
    return result


@task(name="report", **OPTS)
def report(tokens: dict, trained: dict, evaluated: dict, registered: dict, spec: PipelineSpec, run_id: str) -> str:
    """Loss curve, model card and samples table in MLflow and as Prefect artifacts."""
    return reporting.publish(spec, run_id, tokens, trained, evaluated, registered)
