"""MLflow set-up in one place, the run lifecycle, and the metric sink that implements lm's ``on_metrics``."""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lm.training import TrainingInterrupted  # noqa: E402

STORE_DIR = "mlruns"
SYSTEM_METRICS_INTERVAL_S = 5  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
Listener = Callable[[int, Mapping[str, float]], None]
_listeners: list[Listener] = []  # in-process observers (the CLI's progress bar)


def default_tracking_uri(root: Path) -> str:
    """The embedded store: ``sqlite:///<root>/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(root) / STORE_DIR / 'mlflow.db').resolve()}"


def configure(root: Path | str = ".") -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded store under ``root``; returns the URI."""
    return configure_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path(root)))


def configure_uri(uri: str) -> str:
    """Point MLflow's tracking and registry at ``uri`` (e.g. what another process configured)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        _initialise_once(Path(uri.removeprefix("sqlite:///")))
    return uri


_initialised: set[Path] = set()


def _initialise_once(database: Path) -> None:
    """Create or migrate an SQLite store under a file lock: two processes starting on a new store at once
    would otherwise race through MLflow's schema migrations ("table _alembic_tmp_… already exists").
    Once per store and process: `lmp run` and the flow both configure tracking."""
    if database in _initialised:
        return
    _initialised.add(database)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / ".init.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient().search_experiments(max_results=1)


def artifact_location(uri: str) -> str | None:
    """Artifacts of the embedded store live beside its database, under ``mlruns/artifacts``."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None  # a tracking server decides


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def tracked_run(
    experiment: str, run_name: str, tags: Mapping[str, str], resume_run_id: str | None = None
) -> Iterator[str]:
    """Create (or reopen ``resume_run_id``) an MLflow run, yield its id, and end it FINISHED, or
    FAILED/KILLED on an exception."""
    client = MlflowClient()
    if resume_run_id is None:
        uri = mlflow.get_tracking_uri()
        run_id = client.create_run(
            experiment_id(client, experiment, uri), run_name=run_name, tags=dict(tags)
        ).info.run_id
    else:
        run_id = resume_run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        set_tags(run_id, tags)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resume_run_id is not None
    )
    monitor.start()  # CPU, memory, disk, network (and GPU when there is one) as system/* metrics
    try:
        yield run_id
    except (KeyboardInterrupt, TrainingInterrupted) as e:
        _finish(monitor)
        set_tags(run_id, {"lmp.stopped": str(e)[:5000] or type(e).__name__})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as e:
        _finish(monitor)
        set_tags(run_id, {"lmp.failure": f"{type(e).__name__}: {e}"[:5000]})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    _finish(monitor)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _finish(monitor: SystemMetricsMonitor) -> None:
    """Stop the system-metrics thread and log one last sample, so even a short run has one."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # monitoring must never fail a run
        warnings.warn(f"could not log the last system-metrics sample: {e}", stacklevel=2)


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dataset(run_id: str, corpus: Mapping, source: str) -> None:
    """The run's dataset input: one row per document (title, genre), the corpus digest and its source."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    manifest = json.loads((Path(corpus["path"]) / "manifest.json").read_text())
    frame = pd.DataFrame({"title": manifest["titles"], "genre": manifest["genres"]})
    with warnings.catch_warnings():  # a local path resolves to the same source type two ways
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=str(corpus["path"]), name=source[:200], digest=corpus["digest"][:32])
    tags = [InputTag("mlflow.data.context", "training")]
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=tags)]
    try:
        MlflowClient().log_inputs(run_id, datasets=inputs)
    except MlflowException:  # two runs registering the same dataset at once: the loser finds it the second time
        MlflowClient().log_inputs(run_id, datasets=inputs)
    counts = {f"data_chars_{split}": n for split, n in corpus["chars"].items()}
    log_metrics(run_id, counts | {"data_documents": corpus["documents"]})


def log_evaluation(run_id: str, result: Mapping, step: int) -> None:
    """Final metrics at the last training step, the generated sample, and the evaluation protocol."""
    log_metrics(run_id, result["metrics"], step=step)
    client = MlflowClient()
    client.log_text(run_id, result["sample"], "samples/sample.txt")
    client.set_tag(run_id, "eval.protocol", result["protocol"])


class MetricSink:
    """lm's ``on_metrics`` for MLflow: buffers metric rows and writes them in batches.

    A batch goes out every ``flush_rows`` rows or ``flush_seconds`` seconds, whichever comes first,
    so the MLflow UI follows a live run without a database write per step.
    """

    def __init__(self, run_id: str, *, flush_rows: int = 500, flush_seconds: float = 5.0, resuming: bool = False):
        self.run_id, self.flush_rows, self.flush_seconds = run_id, flush_rows, flush_seconds
        self.client = MlflowClient()
        self.buffer: list[Metric] = []
        self.last_flush = time.monotonic()
        self.logged = self._last_logged_steps() if resuming else {}

    def _last_logged_steps(self) -> dict[str, int]:
        """On resume: the last step already in MLflow per metric, so replayed steps are not duplicated."""
        run = self.client.get_run(self.run_id)
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in run.data.metrics}

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.logged.get(k, -1))
        for listener in list(_listeners):
            listener(step, metrics)
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):  # MLflow's per-batch metric limit
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
        self.buffer.clear()
        self.last_flush = time.monotonic()

    def __enter__(self) -> MetricSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # rows reported before a failure are kept too


def relay(run_id: str, after_step: int, keys: tuple[str, ...] = ("train_loss", "tokens_per_second")) -> int:
    """Show the in-process observers the newest metrics another process (a rank) logged to ``run_id`` past
    ``after_step``; returns the newest step seen."""
    if not _listeners:
        return after_step
    client = MlflowClient()
    latest = {key: max(client.get_metric_history(run_id, key), key=lambda m: m.step, default=None) for key in keys}
    step = max((m.step for m in latest.values() if m is not None), default=after_step)
    if step > after_step:
        for listener in list(_listeners):
            listener(step, {k: m.value for k, m in latest.items() if m is not None and m.step == step})
    return step


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Let an in-process observer (a progress bar) see every metric the pipeline reports."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
