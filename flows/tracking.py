"""MLflow set-up in one place, the run lifecycle and the one-shot logging helpers (the metric sink: metric_sink.py)."""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from flows.metric_sink import MetricSink, TrackingUnavailable, forget_outages, listening, relay  # noqa: E402, F401
from lm.training import TrainingInterrupted  # noqa: E402

STORE_DIR = "mlruns"
SYSTEM_METRICS_INTERVAL_S = 5  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


def default_tracking_uri(root: Path) -> str:
    """The embedded store: ``sqlite:///<root>/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(root) / STORE_DIR / 'mlflow.db').resolve()}"


class StoreError(RuntimeError):
    """The embedded store cannot be used as asked (damaged, or read-only for a command that writes); the
    message names it and says what to do. ``exit_code``: 2 for a damaged store, 1 for a read-only one."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def configure(root: Path | str = ".", *, write: bool = False) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded store under ``root``; returns the URI.
    ``write``: the command will write to the store, so a read-only one is refused up front (StoreError)."""
    return configure_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path(root)), write=write)


def configure_uri(uri: str, *, write: bool = False) -> str:
    """Point MLflow's tracking and registry at ``uri`` (e.g. what another process configured)."""
    forget_outages()  # a new run: MLflow's own retries and log lines again, whatever an outage changed
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        check_database(database)
        if write and not writable(database):
            raise StoreError(read_only_message(database, "this command writes runs and models there"), exit_code=1)
        _initialise_once(database)
    return uri


def damaged_message(database: Path, detail: str) -> str:
    return (
        f"{database} is not a readable SQLite database ({detail}); restore it from a backup, or move it away "
        f"(e.g. mv {database} {database}.damaged) to start a new store"
    )


def read_only_message(database: Path, why: str) -> str:
    return (
        f"the store {database.parent} is read-only for this user ({why}); make it writable "
        f"(chmod -R u+w {database.parent}) or set MLFLOW_TRACKING_URI to a store you can write"
    )


SQLITE_HEADER = b"SQLite format 3\x00"


def check_database(database: Path) -> None:
    """Raise StoreError when ``database`` exists but is not a whole SQLite database: a foreign file, or one
    cut short (a partial copy, a full disk) — the header's page count says how long it must be. Reads only
    the first 100 bytes; damage inside the file is reported when a query meets it (see ``store_error``)."""
    try:
        with open(database, "rb") as f:
            header = f.read(100)
        size = database.stat().st_size
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(damaged_message(database, e.strerror or str(e))) from None
    if size == 0:
        return  # a new, empty file: MLflow creates the schema
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise StoreError(damaged_message(database, "file is not a database"))
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and header[24:28] == header[92:96] and size < pages * page_size:  # the page count is valid
        raise StoreError(damaged_message(database, f"database disk image is malformed: {size:,} bytes of "
                                                   f"{pages * page_size:,}, the file was cut short"))  # fmt: skip


def writable(database: Path) -> bool:
    """Whether this process may write the store (its directory, database and artifact folder)."""
    paths = [database.parent, database, database.parent / "artifacts"]
    return all(os.access(p, os.W_OK) for p in paths if p.exists()) and os.access(_existing(database.parent), os.W_OK)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def store_error(error: BaseException) -> StoreError | None:
    """The StoreError an MLflow failure amounts to, when its cause is a damaged or read-only SQLite store
    (looked for along the exception chain); None for anything else."""
    seen, text = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StoreError):
            return error
        text.append(str(error))
        error = error.__cause__ or error.__context__
    joined = " ".join(text)
    uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else ""
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else Path("mlruns/mlflow.db")
    for damaged in ("database disk image is malformed", "file is not a database"):
        if damaged in joined:
            return StoreError(damaged_message(database, damaged))
    for read_only in ("attempt to write a readonly database", "readonly database", "Read-only file system"):
        if read_only in joined:
            return StoreError(read_only_message(database, read_only), exit_code=1)
    return None


_initialised: set[Path] = set()


def _initialise_once(database: Path) -> None:
    """Create or migrate an SQLite store under a file lock: two processes starting on a new store at once
    would otherwise race through MLflow's schema migrations ("table _alembic_tmp_… already exists").
    Once per store and process: `lmp run` and the flow both configure tracking. A store this process may not
    write is only read: no lock file, no migration (reading commands work on a read-only ``mlruns/``)."""
    if database in _initialised:
        return
    if not writable(database):
        if not database.exists():
            raise StoreError(read_only_message(database, f"there is no {database.name} yet to read"), exit_code=1)
        _initialised.add(database)
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / ".init.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient().search_experiments(max_results=1)
    _initialised.add(database)


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
    """Create (or reopen ``resume_run_id``) an MLflow run, yield its id, and end it FINISHED — without the
    failure or stop tags of earlier attempts — or FAILED/KILLED on an exception."""
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
        if isinstance(e, TrackingUnavailable):  # the server is gone: tags and status wait for the resume
            raise
        set_tags(run_id, {"lmp.stopped": str(e)[:5000] or type(e).__name__})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as e:
        _finish(monitor)
        set_tags(run_id, {"lmp.failure": f"{type(e).__name__}: {e}"[:5000]})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    _finish(monitor)
    try:  # a resumed run that finished is no longer failed or stopped
        for key in client.get_run(run_id).data.tags.keys() & {"lmp.failure", "lmp.stopped"}:
            client.delete_tag(run_id, key)
    except MlflowException as e:  # a stale tag must not fail a finished run
        warnings.warn(f"could not clear the tags of earlier attempts of run {run_id}: {e}", stacklevel=2)
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
