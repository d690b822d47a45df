"""`lmp sweep`: a hyperparameter search whose trials fan out over a Dask cluster through Prefect.

The ``lm-sweep`` flow opens a parent MLflow run, runs ingest and tokenize once (every trial reads the
same tokens), then submits one ``trial`` task per combination to a ``DaskTaskRunner`` — a local cluster
of ``max_parallel`` worker processes, or an existing scheduler. Each trial task runs the ``lm-trial``
flow (a child flow run) that trains and evaluates into its own MLflow child run
(``mlflow.parentRunId``). The parent records the ranking and the best trial; only the best model is
registered, then gated as usual.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows import prefect_links, tasks, tracking
from flows.config import AnySpec, SweepConfig, validate_spec
from flows.registry import reports as reporting
from flows.registry import verify as verification
from lm.config import flatten
from lm.results import Evaluation, Init, Trained

PARENT_TAG, TRIAL_TAG, WORKER_TAG = "lmp.sweep.parent", "lmp.sweep.trial", "lmp.sweep.worker"


def task_runner(cfg: SweepConfig, workdir: Path):
    """A Dask task runner: the scheduler at ``cfg.scheduler_address``, else a local cluster of
    ``max_parallel`` single-threaded worker processes bound to 127.0.0.1."""
    import logging

    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # cluster start/stop chatter
    if cfg.scheduler_address:
        return DaskTaskRunner(address=cfg.scheduler_address)
    (workdir / "dask").mkdir(parents=True, exist_ok=True)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.max_parallel,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
            "local_directory": str(workdir / "dask"),
        }
    )


def _trial_name() -> str:
    p = flow_run.parameters
    return f"{p['spec']['name'] if isinstance(p['spec'], dict) else p['spec'].name}-trial-{p['job']['index']}"


def _dask_worker() -> str:
    """The Dask worker running this trial (``tcp://HOST:PORT``): which host trained it, on a shared cluster."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not on a worker
        return "none"


@flow(name="lm-trial", flow_run_name=_trial_name, validate_parameters=False, **tasks.RESULTS)
def lm_trial(spec: AnySpec, job: dict) -> dict:
    """Train and evaluate one trial into an MLflow child run of the sweep. ``job``: index, values, encoded and
    init (as JSON), parent_run_id, workdir, tracking_uri, threads."""
    import torch

    task = tasks.task_of(spec)
    index, values, workdir = job["index"], job["values"], job["workdir"]
    encoded = task.encoded_type.model_validate(job["encoded"])
    init = Init.model_validate(job["init"]) if job["init"] else None
    torch.set_num_threads(job["threads"])  # the trials share the machine's cores
    tracking.configure_uri(job["tracking_uri"])
    client = MlflowClient()
    parent = client.get_run(job["parent_run_id"])
    tags = {
        "mlflow.parentRunId": job["parent_run_id"],
        "pipeline": spec.name,
        TRIAL_TAG: str(index),
        "lmp.sweep.values": json.dumps(values),
        "prefect.flow_run_id": str(flow_run.id),
        WORKER_TAG: _dask_worker(),
    }
    run = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}-trial-{index}", tags=tags)
    run_id = run.info.run_id
    try:
        params = flatten(spec.model_dump(mode="json", exclude={"name", "sweep"}, exclude_none=True))
        tracking.log_params(run_id, params | task.params(encoded, init))
        verification.record(run_id, spec)  # the trial's spec and this machine (its threads), for `lmp verify`
        with tracking.MetricSink(run_id) as sink:
            trained = task.fit(
                encoded,
                init,
                Path(workdir) / "runs" / run_id,
                on_metrics=sink,
                on_start=lambda card: tracking.log_params(run_id, card),
            )
        evaluation = task.evaluate(encoded, trained, init)
        tracking.log_metrics(run_id, evaluation.metrics, step=trained.steps)
        reporting.log_evaluation(run_id, evaluation)
        tracking.log_metrics(
            run_id, {"wall_seconds": trained.wall_seconds, "tokens_per_second": trained.tokens_per_second},
            step=trained.steps,
        )  # fmt: skip
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return {
        "index": index, "run_id": run_id, "values": values, "trained": trained.model_dump(mode="json"),
        "evaluated": evaluation.model_dump(mode="json"),
    }  # fmt: skip


@task(name="trial", cache_policy=tasks.OPTS["cache_policy"], **tasks.RESULTS)
def trial(spec: AnySpec, job: dict) -> dict:
    """One trial on a Dask worker, as a child flow run."""
    return lm_trial(spec, job)


def prepare(spec: AnySpec, workdir: str, base_dir: str) -> dict:
    """The stages every trial shares, run once: init model (when the task starts from one), ingest, tokenize."""
    init = tasks.init_model(spec, workdir) if tasks.task_of(spec).init_from() else None
    prepared = tasks.ingest(spec, workdir, base_dir)
    return {"data": prepared, "encoded": tasks.tokenize(spec, prepared, init, workdir), "init": init}


def register(spec: AnySpec, shared: dict, best: dict, workdir: str):
    """Register the best trial's model (logged into its run) and run the gate."""
    trained, evaluation = Trained.model_validate(best["trained"]), Evaluation.model_validate(best["evaluated"])
    return tasks.register(
        spec, shared["data"], shared["encoded"], trained, evaluation, shared["init"], best["run_id"], workdir
    )


def rank(results: list[dict], metric: str, mode: str) -> list[dict]:
    """Finished trials best first (NaN last)."""

    def key(r: dict) -> float:
        value = r["evaluated"]["metrics"].get(metric, math.nan)
        return math.inf if not math.isfinite(value) else (value if mode == "min" else -value)

    return sorted(results, key=key)


def _sweep_name() -> str:
    spec = flow_run.parameters["spec"]
    return f"{spec['name'] if isinstance(spec, dict) else spec.name}-sweep"


@flow(name="lm-sweep", flow_run_name=_sweep_name, validate_parameters=False, **tasks.RESULTS)
def lm_sweep(spec: AnySpec | dict, workdir: str = ".lmp", base_dir: str = ".") -> dict:
    """Run the pipeline's sweep: shared ingest/tokenize, trials on the task runner, the best registered."""
    spec = validate_spec(spec)
    cfg = spec.sweep
    uri = tracking.configure(Path(base_dir))
    log = get_run_logger()
    metric, mode = cfg.metric or spec.promote.metric, spec.promote.mode
    trials = spec.trials()
    tags = {
        "pipeline": spec.name,
        "config_digest": spec.digest(),
        PARENT_TAG: "true",
        "prefect.flow_run_id": str(flow_run.id),
    }
    run_name = f"{spec.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.tracked_run(
        spec.name, run_name, tags, None, description=spec.description, base_dir=base_dir
    ) as parent:
        tracking.log_params(
            parent,
            {
                "sweep.method": cfg.method,
                "sweep.trials": len(trials),
                "sweep.metric": metric,
                "sweep.parameters": json.dumps(cfg.parameters),
                "sweep.max_parallel": cfg.max_parallel,
            },
        )
        shared = prepare(spec, workdir, base_dir)
        encoded, init = shared["encoded"], shared["init"]
        threads = max(1, (os.cpu_count() or 1) // min(cfg.max_parallel, len(trials)))
        log.info("sweep: %d trials, %d at a time, ranked by %s (%s)", len(trials), cfg.max_parallel, metric, mode)
        common = {
            "encoded": encoded.model_dump(mode="json"),
            "init": init.model_dump(mode="json") if init else None,
            "parent_run_id": parent,
            "workdir": workdir,
            "tracking_uri": uri,
            "threads": threads,
        }
        futures = [trial.submit(s, common | {"index": i, "values": values}) for i, (values, s) in enumerate(trials)]
        results, failed = [], []
        for i, future in enumerate(futures):
            try:
                results.append(future.result())
            except Exception as e:  # one failed trial does not sink the sweep
                log.warning("sweep: trial %d failed: %s", i, e)
                failed.append(i)
        if not results:
            raise RuntimeError(f"every trial of the sweep failed ({len(failed)}); see the trial runs' logs")
        ranking = rank(results, metric, mode)
        best = ranking[0]
        best_spec = trials[best["index"]][1]
        tracking.log_metrics(
            parent,
            {
                f"best_{metric}": best["evaluated"]["metrics"][metric],
                "trials_finished": len(results),
                "trials_failed": len(failed),
            },
        )
        tracking.set_tags(
            parent,
            {
                "lmp.sweep.best_run_id": best["run_id"],
                "lmp.sweep.best_trial": str(best["index"]),
                "lmp.sweep.best_values": json.dumps(best["values"]),
                "data_digest": shared["data"].digest,
                "tokenizer_digest": encoded.tokenizer_digest,
            },
        )
        registered = register(best_spec, shared, best, workdir)
        tracking.set_tags(parent, {"lmp.registered_version": str(registered.version)})
        prefect_links.link_mlflow_run(spec.name, parent)
        log.info("sweep: best trial %d %s; registered %s", best["index"], best["values"], registered.uri)
    return {
        "parent_run_id": parent,
        "metric": metric,
        "ranking": [
            {
                "trial": r["index"],
                "run_id": r["run_id"],
                "values": r["values"],
                metric: r["evaluated"]["metrics"].get(metric),
            }
            for r in ranking
        ],
        "failed": failed,
        "registered": registered.model_dump(),
        "stages": {"ingest": shared["data"].cached, "tokenize": encoded.cached},
    }


@contextmanager
def live_table(spec: AnySpec, since: float, console, every: float = 2.0) -> Iterator[None]:
    """While the sweep runs, a table of its trials (status, values, last train loss, metric) refreshed
    from MLflow every ``every`` seconds."""
    from rich.live import Live
    from rich.table import Table

    metric = spec.sweep.metric or spec.promote.metric
    client, done = MlflowClient(), threading.Event()

    def render() -> Table:
        table = Table(title=f"{spec.name} sweep")
        for column in ("trial", "status", *spec.sweep.parameters, "step", "train_loss", metric):
            table.add_column(column)
        experiment = client.get_experiment_by_name(spec.name)
        runs = (
            []
            if experiment is None
            else client.search_runs(
                [experiment.experiment_id], f"tags.`{TRIAL_TAG}` != '' and attributes.start_time >= {int(since * 1000)}"
            )
        )
        for run in sorted(runs, key=lambda r: int(r.data.tags[TRIAL_TAG])):
            values = json.loads(run.data.tags.get("lmp.sweep.values", "{}"))
            history = client.get_metric_history(run.info.run_id, "train_loss") if run.info.status == "RUNNING" else []
            loss = history[-1].value if history else run.data.metrics.get("train_loss")
            step = max((m.step for m in history), default=None)
            table.add_row(
                run.data.tags[TRIAL_TAG],
                run.info.status,
                *(str(values.get(k, "")) for k in spec.sweep.parameters),
                "" if step is None else str(step),
                "" if loss is None else f"{loss:.4f}",
                f"{run.data.metrics[metric]:.4f}" if metric in run.data.metrics else "",
            )
        return table

    with Live(render(), console=console, refresh_per_second=1, transient=True) as live:

        def poll() -> None:
            while not done.wait(every):
                try:
                    live.update(render())
                except Exception:  # noqa: BLE001 — a display refresh must never break the sweep
                    pass

        thread = threading.Thread(target=poll, daemon=True, name="sweep-table")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)
