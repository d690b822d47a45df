"""Resuming interrupted runs and reconciling runs left RUNNING by a killed process.

A run is resumable when it ended FAILED or KILLED (or was left RUNNING by a process that no longer
exists on this host — the same pid with another start time is another process) and its work directory
holds a step checkpoint whose manifest verifies, or a record that its training finished (``trained.json``
beside a verified ``final/``): such a run goes straight to evaluation and registration. Resuming
continues the same MLflow run: params are not re-logged (they are write-once) and metric steps
continue from the checkpoint without duplicates. A changed model, tokenizer or data setting refuses
the resume and names the keys; only schedule keys may change (once training finished, not max_steps).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from lm.atomic import atomic_write_bytes
from lm.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, sha256_file, verify_checkpoint
from lm.config import flatten
from lm.errors import DataError
from lm.plan import PendingResume
from lm.results import Encoded, Init, Trained

SCHEDULE_KEYS = (
    "train.max_steps",
    "train.eval_interval",
    "train.log_interval",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
)
PID_TAG, HOST_TAG, START_TAG = "lmp.pid", "lmp.host", "lmp.pid_start"
TRAINED = "trained.json"  # in a run's directory once its training finished: the result and its inputs


class StopRequest:
    """SIGTERM or a first Ctrl-C asks training to finish its step, checkpoint and stop; a second Ctrl-C
    interrupts at once. Process-wide; the train task installs it around training and polls ``requested``."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def requested(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, frame: object) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.event.set()

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Own SIGTERM and SIGINT while training (Prefect's flow engine installs a SIGTERM handler that
        aborts mid-step); restore the previous handlers after. Only the main thread can set handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


STOP = StopRequest()


class ResumeRefused(DataError):
    """The interrupted run was made with different settings; the message lists them and suggests --fresh."""

    def __init__(self, message: str, run_id: str = ""):
        super().__init__(message)
        self.run_id = run_id


@dataclass(frozen=True)
class Resume:
    run_id: str
    checkpoint: Path
    """A step checkpoint, or ``final/`` when the run's training finished (see ``read_trained``)."""
    step: int
    rejected: list[str]


def process_tags() -> dict[str, str]:
    """Tags that let a later start tell whether this run's process is still alive: host, pid, and when
    that process started (a pid is reused by later processes; its start time is not)."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    if started := start_time(os.getpid()):
        tags[START_TAG] = started
    return tags


def start_time(pid: int) -> str | None:
    """When process ``pid`` started, as a token another process with the same pid cannot share: its start
    in clock ticks since boot (Linux, exact), else psutil's creation time. None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return "ticks:" + stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (…) may hold spaces
    except (OSError, IndexError):
        pass
    try:
        return f"created:{psutil.Process(pid).create_time():.3f}"
    except (psutil.Error, OSError):
        return None


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(tags: dict[str, str]) -> bool:
    """Whether the process that recorded these tags on this host no longer runs: its pid is free, or now
    names a process that started at another time. Runs of other hosts, or without a pid, are never gone."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    pid = int(tags[PID_TAG])
    if not _alive(pid):
        return True
    recorded, now = tags.get(START_TAG), start_time(pid)
    return recorded is not None and now is not None and recorded != now  # unknown: assume it is ours


def reconcile_stale(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process on this host is gone; returns their ids."""
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if _gone(run.data.tags):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            stale.append(run.info.run_id)
    return stale


TRAJECTORY = ("data", "tokenizer", "model", "train", "head")  # the sections that decide what training computes


def trajectory(spec_params: dict[str, object]) -> dict[str, str]:
    """The flattened settings that decide what training computes, as logged (strings, MLflow's length)."""
    return {k: str(v)[:6000] for k, v in spec_params.items() if k.split(".")[0] in TRAJECTORY and "." in k}


def changed_keys(old_params: dict[str, str], spec_params: dict[str, object]) -> list[str]:
    """Keys that decide the training trajectory (data, tokenizer, model, train — schedule keys excepted)
    whose value differs between the interrupted run and now. Evaluation, promotion and scheduling settings
    may change freely."""
    new = trajectory(spec_params)
    return sorted(k for k, v in new.items() if k not in SCHEDULE_KEYS and old_params.get(k) != v)


def spec_settings(spec) -> dict[str, str]:
    """``trajectory`` of a spec, flattened as its run's params are."""
    return trajectory(flatten(spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)))


def training_inputs(encoded: Encoded, init: Init | None) -> dict[str, str | None]:
    """What training read besides its settings: the data and tokenizer digests (and the initialising
    weights of a model that starts from a registered one)."""
    return {
        "data_digest": encoded.data_digest,
        "tokenizer_digest": encoded.tokenizer_digest,
        "init_weights": sha256_file(Path(init.package.weights)) if init else None,
    }


def record_trained(out: Path, settings: dict[str, str], inputs: dict, trained: Trained) -> None:
    """Once training finished: its result with the settings and inputs it was made with, tied to the
    ``final/`` checkpoint's manifest, so that a failure later in the run (evaluation, registration, a
    stop) resumes from ``final/`` without training again."""
    final = Path(trained.checkpoint)
    result = trained.model_dump(mode="json")
    record = {"result": result, "settings": settings, "inputs": inputs, "manifest": sha256_file(final / MANIFEST)}
    atomic_write_bytes(Path(out) / TRAINED, json.dumps(record, indent=2).encode())


def read_trained(out: Path) -> dict | None:
    """The record of this run directory's finished training, when its ``final/`` checkpoint verifies and
    is the one recorded; None otherwise (no record, unreadable, or a damaged checkpoint)."""
    final = Path(out) / "final"
    try:
        record = json.loads((Path(out) / TRAINED).read_text())
        verify_checkpoint(final)
        if record["manifest"] != sha256_file(final / MANIFEST):
            return None
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    record["result"]["checkpoint"] = str(final)  # wherever the work directory is named from now
    return record


FREE_AFTER_TRAINING = tuple(k for k in SCHEDULE_KEYS if k != "train.max_steps")


def trained_changes(record: dict, settings: dict[str, str], inputs: dict | None = None) -> list[str]:
    """Settings (and, when given, inputs) of the finished training that differ now; only the schedule keys
    that did not change the result (intervals, kept checkpoints) may."""
    keys = set(record["settings"]) | set(settings)
    changed = [k for k in keys if k not in FREE_AFTER_TRAINING and record["settings"].get(k) != settings.get(k)]
    if inputs is not None:
        changed += [k for k, v in inputs.items() if record["inputs"].get(k) != v]
    return sorted(changed)


def refuse_changed(run_id: str, changed: list[str]) -> ResumeRefused:
    return ResumeRefused(
        f"the interrupted run {run_id} was made with different settings: {', '.join(changed)}; "
        "restore them to resume, or pass --fresh to start a new run",
        run_id,
    )


def prepare_resume(spec, workdir: str | Path, fresh: bool) -> Resume | None:
    """At a pipeline's start: reconcile stale runs, then find the run to resume (None: start fresh)."""
    import mlflow

    from flows.tracking import experiment_id

    client = MlflowClient()
    exp = experiment_id(client, spec.name, mlflow.get_tracking_uri())
    reconcile_stale(client, exp)
    if fresh:
        return None
    return find_resumable(client, exp, spec.model_dump(mode="json", exclude={"name"}, exclude_none=True), Path(workdir))


def find_resumable(
    client: MlflowClient, experiment_id: str, spec_dump: dict, workdir: Path, *, stale: bool = False
) -> Resume | None:
    """The newest interrupted run of this pipeline with a valid checkpoint, if any. ``stale``: count a run
    left RUNNING by a process that is gone as interrupted (what ``reconcile_stale`` would mark KILLED).

    Raises ResumeRefused when that run's settings differ from ``spec_dump`` beyond schedule keys.
    """
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    gone = stale and runs[0].info.status == "RUNNING" and _gone(runs[0].data.tags)
    if runs[0].info.status not in ("FAILED", "KILLED") and not gone:
        return None
    run, run_dir = runs[0], Path(workdir) / "runs" / runs[0].info.run_id
    trained = read_trained(run_dir)
    checkpoint, rejected = (run_dir / "final", []) if trained else latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    changed = changed_keys(run.data.params, flatten(spec_dump))
    if trained and not changed:  # its training finished: even max_steps must be what it was
        changed = trained_changes(trained, trajectory(flatten(spec_dump)))
    if changed:
        raise refuse_changed(run.info.run_id, changed)
    if trained:
        return Resume(run.info.run_id, checkpoint, trained["result"]["steps"], rejected)
    return Resume(run.info.run_id, checkpoint, int(checkpoint.name.split("-")[1]), rejected)


def pending_resume(spec, workdir: str | Path, tracking_uri: str) -> PendingResume | None:
    """What the next ``lmp run`` of ``spec`` would resume (or refuse to resume) from the store at
    ``tracking_uri``, found without changing anything: no run is started or marked KILLED, no experiment or
    store is created."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None  # no store yet: nothing to resume, and opening one would create it
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        return None
    dump = spec.model_dump(mode="json", exclude={"name"}, exclude_none=True)
    try:
        resume = find_resumable(client, experiment.experiment_id, dump, Path(workdir), stale=True)
    except ResumeRefused as e:
        return PendingResume(e.run_id, None, refused=str(e))
    if resume is None:
        return None
    return PendingResume(resume.run_id, resume.step, finished=resume.checkpoint.name == "final")
