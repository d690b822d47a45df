"""Resuming interrupted runs and reconciling runs left RUNNING by a killed process.

A run is resumable when it ended FAILED or KILLED (or was left RUNNING by a process that no longer
exists on this host) and its work directory holds a step checkpoint whose manifest verifies. Resuming
continues the same MLflow run: params are not re-logged (they are write-once) and metric steps
continue from the checkpoint without duplicates. A changed model, tokenizer or data setting refuses
the resume and names the keys; only schedule keys may change.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from lm.checkpoint import latest_checkpoint
from lm.config import flatten
from lm.errors import DataError

SCHEDULE_KEYS = (
    "train.max_steps",
    "train.eval_interval",
    "train.log_interval",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
)
PID_TAG, HOST_TAG = "lmp.pid", "lmp.host"


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


@dataclass(frozen=True)
class Resume:
    run_id: str
    checkpoint: Path
    step: int
    rejected: list[str]


def process_tags() -> dict[str, str]:
    """Tags that let a later start tell whether this run's process is still alive."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reconcile_stale(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process on this host is gone; returns their ids."""
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) == socket.gethostname() and PID_TAG in tags and not _alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            stale.append(run.info.run_id)
    return stale


TRAJECTORY = ("data", "tokenizer", "model", "train", "head")  # the sections that decide what training computes


def changed_keys(old_params: dict[str, str], spec_params: dict[str, object]) -> list[str]:
    """Keys that decide the training trajectory (data, tokenizer, model, train — schedule keys excepted)
    whose value differs between the interrupted run and now. Evaluation, promotion and scheduling settings
    may change freely."""
    new = {k: str(v)[:6000] for k, v in spec_params.items() if k.split(".")[0] in TRAJECTORY and "." in k}
    return sorted(k for k, v in new.items() if k not in SCHEDULE_KEYS and old_params.get(k) != v)


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


def find_resumable(client: MlflowClient, experiment_id: str, spec_dump: dict, workdir: Path) -> Resume | None:
    """The newest interrupted run of this pipeline with a valid checkpoint, if any.

    Raises ResumeRefused when that run's settings differ from ``spec_dump`` beyond schedule keys.
    """
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status not in ("FAILED", "KILLED"):
        return None
    run = runs[0]
    checkpoint, rejected = latest_checkpoint(Path(workdir) / "runs" / run.info.run_id)
    if checkpoint is None:
        return None
    changed = changed_keys(run.data.params, flatten(spec_dump))
    if changed:
        raise ResumeRefused(
            f"the interrupted run {run.info.run_id} was made with different settings: {', '.join(changed)}; "
            "restore them to resume, or pass --fresh to start a new run"
        )
    return Resume(run.info.run_id, checkpoint, int(checkpoint.name.split("-")[1]), rejected)
