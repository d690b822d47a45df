"""MLflow set-up in one place, the run lifecycle and the one-shot logging helpers (the metric sink: metric_sink.py)."""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import sqlite3
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import quote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from flows.metric_sink import MetricSink, TrackingUnavailable, forget_outages, listening, relay  # noqa: E402, F401
from lm.report import DatasetRecord  # noqa: E402
from lm.training import TrainingInterrupted  # noqa: E402

STORE_DIR = "mlruns"
PROJECT_FILE = "pipelines.yaml"
SYSTEM_METRICS_INTERVAL_S = 5  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
# What MLflow 3's UI calls a classic (non-GenAI) experiment: its experiment-type selector writes this tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE = "mlflow.note.content"  # the description the UI shows (and edits) on an experiment's and a run's page
DESCRIBED = "lmp.description"  # the experiment description last written from the pipelines file
log = logging.getLogger(__name__)


def default_tracking_uri(root: Path) -> str:
    """The embedded store: ``sqlite:///<root>/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(root) / STORE_DIR / 'mlflow.db').resolve()}"


class StoreError(RuntimeError):
    """The embedded store cannot be used as asked (damaged, or read-only for a command that writes); the
    message names it and says what to do. ``exit_code``: 2 for a damaged store, 1 for a read-only one."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def project_root(start: Path | str) -> Path | None:
    """The nearest directory from ``start`` upward that is a project (holds pipelines.yaml) or already holds an
    embedded store; None when there is none."""
    start = Path(start).resolve()
    for directory in (start, *start.parents):
        if (directory / PROJECT_FILE).is_file() or (directory / STORE_DIR / "mlflow.db").is_file():
            return directory
    return None


def configure_project(start: Path | str | None = None, *, write: bool = False) -> str:
    """``configure`` for a command run anywhere inside a project: ``MLFLOW_TRACKING_URI``, else the embedded
    store of the project around ``start`` (default: the working directory). Outside a project it refuses
    (StoreError, exit 2) rather than create an empty store where nobody will look for it."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return configure_uri(uri, write=write)
    start = Path.cwd() if start is None else Path(start)
    root = project_root(start)
    if root is None:
        raise StoreError(
            f"{start.resolve()} is not inside a project (no {PROJECT_FILE} there or in a parent directory, and no "
            f"{STORE_DIR}/mlflow.db); cd into the project, or set MLFLOW_TRACKING_URI to the store to use"
        )
    return configure(root, write=write)


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


def ui_url(base: str, page: str = "") -> str:
    """``page`` (e.g. ``experiments/3``, ``experiments/3/runs/RUN``, ``models/NAME``) of the MLflow UI at ``base``,
    in its model-training mode: MLflow 3's UI opens in its GenAI mode (traces, no runs table) unless the URL or a
    click in that browser says otherwise — it does not read the experiment's kind tag for this."""
    return f"{base.rstrip('/')}/#/{quote(page.strip('/'), safe='/')}?workflowType=machine_learning"


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
        repair_artifact_roots(database)
    _initialised.add(database)


PROXIED = "mlflow-artifacts:"
# Where MLflow's SQL store keeps artifact locations (the model-version columns hold them for some versions).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def repair_artifact_roots(database: Path) -> int:
    """Rewrite ``mlflow-artifacts:/…`` locations in the store to the files they stand for; returns how many.

    An MLflow server started with ``--serve-artifacts`` (as `lmp up` did before it used a file artifact root)
    gives the experiments it creates the root ``mlflow-artifacts:/N``; only an HTTP client of that server can
    resolve it, so a run on the embedded store fails at its first artifact. `lmp up`'s server always put
    those artifacts in ``mlruns/artifacts`` beside the database (``--artifacts-destination``), so
    ``mlflow-artifacts:/N/…`` is the file ``mlruns/artifacts/N/…``: the same bytes, now under a URI every
    client reads. Nothing moves; the rows change in one transaction."""
    root = (database.parent / "artifacts").resolve().as_uri()
    with closing(sqlite3.connect(database, timeout=60, isolation_level=None)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = [(t, c) for t, c in LOCATION_COLUMNS if t in tables and c in _columns(db, t)]
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = 0
            for table, column in columns:
                rows = db.execute(f"SELECT rowid, {column} FROM {table} WHERE {column} LIKE ?", (PROXIED + "%",))
                for rowid, value in rows.fetchall():
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (_as_file(value, root), rowid))
                    changed += 1
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    if changed:
        log.info("%s: %d artifact locations moved from %s/ to %s", database, changed, PROXIED, root)
    return changed


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _as_file(uri: str, root: str) -> str:
    """``mlflow-artifacts:/2/abc/artifacts`` (or ``mlflow-artifacts://host:port/2/…``) → ``<root>/2/abc/artifacts``."""
    path = uri.removeprefix(PROXIED)
    if path.startswith("//"):  # an authority (host:port) before the path
        path = "/" + path[2:].partition("/")[2]
    return root + "/" + path.lstrip("/") if path.strip("/") else root


def artifact_location(uri: str) -> str | None:
    """Artifacts of the embedded store live beside its database, under ``mlruns/artifacts``."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None  # a tracking server decides


def experiment_id(client: MlflowClient, name: str, uri: str, description: str | None = None) -> str:
    """The id of experiment ``name``, created if new; its UI conventions set either way (see ``label_experiment``)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            created = client.create_experiment(name, artifact_location=artifact_location(uri))
        except mlflow.exceptions.MlflowException:  # created concurrently
            created = None
        exp = client.get_experiment(created) if created else client.get_experiment_by_name(name)
    label_experiment(client, exp, description)
    return exp.experiment_id


def label_experiment(client: MlflowClient, exp, description: str | None) -> None:
    """Make the MLflow UI show ``exp`` as what it is: a model-training experiment (MLflow 3's UI otherwise offers
    its GenAI views) described by the pipeline's description. A kind or a description someone set by hand in
    the UI is kept: the description is replaced only while it is still the one written here."""
    tags, wanted = exp.tags, {}
    if EXPERIMENT_KIND[0] not in tags:
        wanted[EXPERIMENT_KIND[0]] = EXPERIMENT_KIND[1]
    if description and tags.get(NOTE, "") in ("", tags.get(DESCRIBED)) and tags.get(NOTE) != description:
        wanted |= {NOTE: description, DESCRIBED: description}
    for key, value in wanted.items():
        try:
            client.set_experiment_tag(exp.experiment_id, key, value)
        except MlflowException as e:  # a label must never stop a run
            warnings.warn(f"could not set {key} on experiment {exp.name}: {e}", stacklevel=2)


def run_source() -> tuple[str, str]:
    """``mlflow.source.name`` and ``mlflow.source.type`` of a run started by this process: the `lmp` command
    (``lmp run``, ``lmp sweep``), ``lmp schedule`` for the runs it serves (a job), else the program's name."""
    if os.environ.get("LMP_SCHEDULE_CONFIG"):  # set by `lmp schedule` (flows.ops.schedule.run_context_env)
        return "lmp schedule", "JOB"
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return (f"lmp {command}".strip() if program == "lmp" else program), "LOCAL"


def run_tags(base_dir: Path | str = ".") -> dict[str, str]:
    """MLflow's own run tags the UI shows: user, source and its type, and the git commit of ``base_dir``."""
    from flows.registry.register import (
        git_commit,  # imported late: flows.registry.register imports this module's neighbours
    )

    name, kind = run_source()
    tags = {"mlflow.user": _user(), "mlflow.source.name": name, "mlflow.source.type": kind}
    if (commit := git_commit(Path(base_dir))) != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())


def run_note(tags: Mapping[str, str], description: str = "") -> str:
    """The run's description (markdown) from what its tags say it is: the pipeline, its data and config, who
    started it from which code, and whether it is a fresh run or a resumed one."""
    pipeline = tags.get("pipeline", "?")
    lines = [f"Pipeline `{pipeline}`" + (f": {description}" if description else "."), ""]
    if digest := tags.get("data_digest"):
        lines.append(f"- data: digest `{digest[:16]}`")
    else:
        lines.append("- data: digest not known yet (recorded once the data is read)")
    if digest := tags.get("config_digest"):
        lines.append(f"- config: digest `{digest[:16]}`")
    if overrides := tags.get("lmp.overrides"):
        lines.append(f"- changed from the pipelines file: {overrides}")
    started = f"- started by `{tags.get('mlflow.source.name', '?')}` as `{tags.get('mlflow.user', '?')}`"
    if commit := tags.get("mlflow.source.git.commit"):
        started += f", code at git `{commit[:12]}`"
    lines.append(started)
    if step := tags.get("lmp.resumed_from_step"):
        lines.append(f"- resumed from the checkpoint at step {step} (same MLflow run)")
    else:
        lines.append("- a fresh run")
    return "\n".join(lines)


def describe_run(run_id: str, description: str = "") -> None:
    """Write the run's description (``mlflow.note.content``) from its current tags."""
    client = MlflowClient()
    try:
        client.set_tag(run_id, NOTE, run_note(client.get_run(run_id).data.tags, description))
    except Exception as e:  # a description must never fail a run (nor hide why it failed)
        warnings.warn(f"could not describe run {run_id}: {e}", stacklevel=2)


@contextmanager
def tracked_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    resume_run_id: str | None = None,
    *,
    description: str = "",
    base_dir: Path | str = ".",
) -> Iterator[str]:
    """Create (or reopen ``resume_run_id``) an MLflow run, yield its id, and end it FINISHED — without the
    failure or stop tags of earlier attempts — or FAILED/KILLED on an exception.

    ``description`` (the pipeline's) describes the experiment; the run gets MLflow's user, source and git-commit
    tags (the commit of ``base_dir``) and a description of what it is, written again as it ends (by then its
    data digest is known)."""
    client = MlflowClient()
    tags = run_tags(base_dir) | dict(tags)
    if resume_run_id is None:
        uri = mlflow.get_tracking_uri()
        exp = experiment_id(client, experiment, uri, description)
        run_id = client.create_run(exp, run_name=run_name, tags=tags | {NOTE: run_note(tags, description)}).info.run_id
    else:
        run_id = resume_run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        experiment_id(client, experiment, mlflow.get_tracking_uri(), description)
        set_tags(run_id, tags)
        describe_run(run_id, description)
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
        describe_run(run_id, description)
        raise
    except BaseException as e:
        _finish(monitor)
        set_tags(run_id, {"lmp.failure": f"{type(e).__name__}: {e}"[:5000]})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        describe_run(run_id, description)
        raise
    _finish(monitor)
    describe_run(run_id, description)
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
    if params:
        MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    if tags:
        MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dataset(run_id: str, record: DatasetRecord) -> None:
    """The run's dataset input (the task's rows: documents, or examples per split and class), its digest and
    source, and its counts as metrics."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():  # a local path resolves to the same source type two ways; int columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(
            pd.DataFrame(record.rows), source=record.path, name=record.source[:200], digest=record.digest[:32]
        )._to_mlflow_entity()
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
    try:
        MlflowClient().log_inputs(run_id, datasets=inputs)
    except MlflowException:  # two runs registering the same dataset at once: the loser finds it the second time
        MlflowClient().log_inputs(run_id, datasets=inputs)
    log_metrics(run_id, record.counts)
