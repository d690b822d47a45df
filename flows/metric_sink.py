"""The metric sink that implements lm's ``on_metrics`` for MLflow, built to survive a tracking outage.

Rows go to MLflow from a background thread through a bounded, fsynced on-disk journal; while the server is
away training continues (up to ``LMP_TRACKING_OUTAGE_SECONDS``), the journal replays in order when it
returns (no gaps, no duplicate rows), and past the limit the run stops at a checkpoint with one message.
In-process observers (the CLI's progress bar) see every row through ``listening``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lm.training import TrainingInterrupted

Listener = Callable[[int, Mapping[str, float]], None]
_listeners: list[Listener] = []  # in-process observers (the CLI's progress bar)


class TrackingUnavailable(TrainingInterrupted):
    """The tracking server stayed unreachable past the limit (or the metric buffer filled up): training
    stopped at a checkpoint, and the buffered metric rows wait on disk for the run to resume."""

    def __init__(self, message: str, step: int = 0, checkpoint: Path | None = None):
        super().__init__(step, checkpoint)
        self.args = (message,)


OUTAGE_ENV = "LMP_TRACKING_OUTAGE_SECONDS"
OUTAGE_SECONDS = 300.0  # how long training goes on while the tracking server is away
BUFFER_NAME = "metrics-buffer.jsonl"
BUFFER_BYTES = 64 * 2**20  # unacknowledged rows kept on disk (≈ 600k rows) before the run stops
REQUEST_TIMEOUT_S = 10  # one metric request; a dead server refuses at once, a hung one costs this
RETRY_S = (0.25, 2.0)  # first and longest pause between attempts while the server is away
BATCH_LIMIT = 1000  # MLflow's per-batch metric limit
_outages: set[str] = set()  # URIs some sink currently finds unreachable


class _QuietDuringOutage(logging.Filter):
    """While a sink knows the server is away, MLflow's other callers (the system-metrics thread) would print
    a urllib3 "Retrying …" line per attempt and a warning per sample: the sink's one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_outages and record.levelno <= logging.WARNING)


for _name in ("urllib3.connectionpool", "mlflow.system_metrics.system_metrics_monitor"):
    logging.getLogger(_name).addFilter(_QuietDuringOutage())


def outage_limit() -> float:
    """``LMP_TRACKING_OUTAGE_SECONDS`` or the default; a bad value is an error that names the variable."""
    raw = os.environ.get(OUTAGE_ENV)
    try:
        value = OUTAGE_SECONDS if raw in (None, "") else float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{OUTAGE_ENV}={raw!r} is not a number of seconds ≥ 0; unset it or use e.g. 300")
    return value


def describe(uri: str) -> str:
    return f"tracking server {uri}" if uri.startswith(("http://", "https://")) else f"tracking store {uri}"


# MLflow's HTTP retries (7, exponential back-off: minutes per call against a dead server), shortened for
# the other callers in the process (the system-metrics thread) while a sink trains against a server, and cut
# to none once the sink gave up on it, so ending the run does not hang. A value the user set is kept.
TRAINING_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}  # fmt: skip
GAVE_UP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_retries: dict = {"holds": 0, "saved": None, "gave_up": False}


def _set_retries(values: dict[str, str]) -> None:
    if _retries["saved"] is None:
        _retries["saved"] = {name: os.environ.get(name) for name in TRAINING_RETRIES}
    for name, value in values.items():
        if _retries["saved"][name] is None:
            os.environ[name] = value


def _restore_retries() -> None:
    """MLflow's own retries again (configure_uri: a new run starts)."""
    for name, value in (_retries["saved"] or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _retries.update(saved=None, gave_up=False)


def forget_outages() -> None:
    """Unless a sink is training now, MLflow's own retries and log lines again and no server marked away."""
    if _retries["holds"] == 0:
        _restore_retries()
        _outages.clear()


def _hold_retries() -> None:
    _retries["holds"] += 1
    if not _retries["gave_up"]:
        _set_retries(TRAINING_RETRIES)


def _release_retries() -> None:
    _retries["holds"] -= 1
    if _retries["holds"] == 0 and not _retries["gave_up"]:
        _restore_retries()


def _gave_up_retries() -> None:
    _retries["gave_up"] = True
    _set_retries(GAVE_UP_RETRIES)


def _recovered_retries() -> None:
    """The server answers again: back to the training setting (or MLflow's own when no sink trains)."""
    if _retries["gave_up"]:
        _restore_retries()
        if _retries["holds"]:
            _set_retries(TRAINING_RETRIES)


class _Transient(Exception):
    """The store did not take the request (unreachable, timed out, busy, 5xx): try again later."""


@contextmanager
def _local_store_errors() -> Iterator[None]:
    """An embedded store that is busy (another process writing) or briefly unavailable: try again later.
    Anything else (a damaged or read-only database) is an error training hears of."""
    try:
        yield
    except MlflowException as e:
        if any(s in str(e) for s in ("database is locked", "disk I/O error", "unable to open database")):
            raise _Transient(str(e)[:300]) from e
        raise


def _reason(error: str) -> str:
    """The gist of a failed request ("[Errno 111] Connection refused", "Read timed out") for a one-line message."""
    if found := re.search(r"\[Errno -?\d+\][^\"')]*|\w+Error\(-?\d+, '[^']*'\)|Read timed out|timed out", error):
        return found.group(0).strip()
    return error.split(" with exception ")[-1][:200]


class _Store:
    """The two calls the sink makes, each one attempt: a tracking server is asked without MLflow's minutes of
    HTTP retries (the sink retries on its own clock), an embedded store through the client."""

    def __init__(self, client: MlflowClient, uri: str):
        self.client, self.uri = client, uri
        from mlflow.store.tracking.rest_store import RestStore

        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        self.rest = store if isinstance(store, RestStore) else None

    def _request(self, endpoint: str, method: str, **body):
        from mlflow.exceptions import RestException
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        try:
            response = http_request(
                self.rest.get_host_creds(), endpoint, method, max_retries=0, timeout=REQUEST_TIMEOUT_S, **body
            )
            return verify_rest_response(response, endpoint).json()
        except RestException as e:
            if e.get_http_status_code() >= 500 or e.get_http_status_code() == 429:
                raise _Transient(str(e)) from e
            raise
        except MlflowException as e:  # could not connect, timed out, or an answer that is not MLflow's
            raise _Transient(_reason(str(e))) from e

    def log_batch(self, run_id: str, metrics: list[Metric]) -> None:
        if self.rest is None:
            with _local_store_errors():
                self.client.log_batch(run_id, metrics=metrics)
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        self._request("/api/2.0/mlflow/runs/log-batch", "POST", json=json.loads(body))

    def latest_steps(self, run_id: str) -> dict[str, int]:
        """The newest step MLflow holds per metric key of the run."""
        if self.rest is None:
            with _local_store_errors():
                return {m.key: m.step for m in self.client.get_run(run_id).data.to_proto().metrics}
        run = self._request("/api/2.0/mlflow/runs/get", "GET", params={"run_id": run_id})["run"]
        return {m["key"]: int(m.get("step", 0)) for m in run.get("data", {}).get("metrics", [])}


def _lines(rows: list[Metric]) -> bytes:
    """Metric rows as JSON lines (NaN and ±inf as Python's json writes them)."""
    return b"".join(
        json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}).encode() + b"\n"
        for m in rows
    )


class _Journal:
    """The on-disk buffer: one JSON line per metric row the store has not acknowledged, appended and fsynced
    a batch at a time, rewritten (temp + rename) when compacted, deleted when drained."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size if path.exists() else 0

    def _folder(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the run's folder, shared with its checkpoints

    def load(self) -> list[Metric]:
        """The rows an earlier process left (a crash leaves at most a torn last line, which is dropped: that
        batch's steps come after the newest checkpoint, and training reports them again)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_bytes().splitlines():
            try:
                row = json.loads(line)
                rows.append(Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])))
            except (ValueError, KeyError, TypeError):
                continue
        return rows

    def append(self, data: bytes) -> None:
        self._folder()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.size += len(data)

    def rewrite(self, data: bytes) -> None:
        if not data:
            self.delete()
            return
        self._folder()
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        self.size = len(data)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        self.size = 0


def _run_logger():
    """The Prefect task's logger when the sink is made inside a task (its lines reach the run's log and the
    console), else this module's."""
    if "prefect" in sys.modules:
        try:
            from prefect import get_run_logger

            return get_run_logger()
        except Exception:  # not inside a flow or task run
            pass
    return logging.getLogger(__name__)


class MetricSink:
    """lm's ``on_metrics`` for MLflow: buffers metric rows and sends them in batches from a background thread.

    A batch goes out every ``flush_rows`` rows or ``flush_seconds`` seconds, whichever comes first, so the
    MLflow UI follows a live run without a database write per step. Each batch is first appended (fsynced) to
    ``<buffer_dir>/metrics-buffer.jsonl`` (default ``.lmp/runs/<run_id>/``), deleted once the store has
    acknowledged every row, so training never waits for the tracking server. While the server is away the
    rows stay on disk and go out in order when it returns; none is sent twice (after a failed request the
    store is asked whether it took the batch). Past ``outage_seconds`` (default ``LMP_TRACKING_OUTAGE_SECONDS``
    or 300) or ``buffer_bytes`` of unsent rows, ``should_stop()`` says yes — training checkpoints and stops —
    and leaving the sink raises TrackingUnavailable naming the server. Rows an earlier process left in the
    buffer are sent first when the same run resumes.
    """

    def __init__(
        self,
        run_id: str,
        *,
        flush_rows: int = 500,
        flush_seconds: float = 5.0,
        resuming: bool = False,
        buffer_dir: Path | str | None = None,
        outage_seconds: float | None = None,
        buffer_bytes: int = BUFFER_BYTES,
    ):
        self.run_id, self.flush_rows, self.flush_seconds = run_id, flush_rows, flush_seconds
        self.limit = outage_limit() if outage_seconds is None else outage_seconds
        self.buffer_bytes = buffer_bytes
        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        self.store = _Store(self.client, self.uri)
        self.log = _run_logger()
        self.journal = _Journal(Path(buffer_dir or Path(".lmp") / "runs" / run_id).absolute() / BUFFER_NAME)
        self.buffer: list[Metric] = []  # the batch being gathered (training's thread only)
        self.queue: deque[tuple[list[Metric], int]] = deque()  # (rows, journal bytes) not yet acknowledged
        self.unsent_bytes = 0
        self.cond = threading.Condition()
        self.outage_since: float | None = None
        self.uncertain = False  # the last request failed: the store may or may not have taken its batch
        self.gave_up: str | None = None  # "outage" or "full"
        self.gave_up_after = 0.0
        self.fatal: BaseException | None = None
        self.polled = self.closed = False
        self.step = 0
        self.last_flush = time.monotonic()
        earlier = self.journal.load()
        self.logged = self._last_logged_steps() if (resuming or earlier) else {}
        earlier = [m for m in earlier if m.step > self.logged.get(m.key, -1)]  # the rest reached the store
        for m in earlier:  # steps that training reports again after a resume are in the buffer already
            self.logged[m.key] = max(self.logged.get(m.key, -1), m.step)
        self.journal.rewrite(self._queue(earlier))
        self.http, self.released = self.store.rest is not None, False
        if self.http:
            _hold_retries()
        self.thread = threading.Thread(target=self._send_loop, name="lmp-metric-sink", daemon=True)
        self.thread.start()

    def _last_logged_steps(self) -> dict[str, int]:
        """The last step already in MLflow per metric, so replayed steps are not duplicated."""
        return {m.key: m.step for m in self.client.get_run(self.run_id).data.to_proto().metrics}

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.step = max(self.step, step)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.logged.get(k, -1))
        for listener in list(_listeners):
            listener(step, metrics)
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self._enqueue()

    def flush(self) -> None:
        """Make every row reported so far durable (a checkpoint follows): on disk now, and in MLflow before
        this returns while the store answers (within REQUEST_TIMEOUT_S); while it is away, as soon as it
        returns."""
        self._enqueue()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        with self.cond:
            while self.queue and self.outage_since is None and self.fatal is None and time.monotonic() < deadline:
                self.cond.wait(0.1)

    def _enqueue(self) -> None:
        """Append the gathered rows to the journal and hand them to the sender."""
        if self.fatal is not None:
            raise self.fatal
        if self.gave_up is not None and not self.polled:  # nobody asks should_stop(): stop here
            raise TrackingUnavailable(self._message(self.step, None), self.step)
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        with self.cond:
            self.journal.append(self._queue(rows))
            if self.unsent_bytes > self.buffer_bytes and self.gave_up is None:
                self._give_up("full")
            self.cond.notify_all()

    def should_stop(self) -> bool:
        """Whether the store has been away past the limit, or the buffer is full: training should stop at a
        checkpoint (leaving the sink then raises TrackingUnavailable)."""
        self.polled = True
        return self.gave_up is not None

    def _queue(self, rows: list[Metric]) -> bytes:
        """Queue ``rows`` in batches MLflow accepts; returns their journal lines."""
        data = []
        for i in range(0, len(rows), BATCH_LIMIT):
            batch = rows[i : i + BATCH_LIMIT]
            data.append(_lines(batch))
            self.queue.append((batch, len(data[-1])))
            self.unsent_bytes += len(data[-1])
        return b"".join(data)

    def _give_up(self, why: str) -> None:
        self.gave_up = why
        self.gave_up_after = time.monotonic() - (self.outage_since or time.monotonic())
        if self.http:
            _gave_up_retries()

    def _send_loop(self) -> None:
        pause = RETRY_S[0]
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                batch = self.queue[0][0]
            started = time.monotonic()
            try:
                if not (self.uncertain and self._taken(batch)):
                    self.store.log_batch(self.run_id, batch)
            except _Transient as e:
                self._failed(started, str(e))
            except BaseException as e:  # refused for good (a bad value, a deleted run): training hears of it
                with self.cond:
                    self.fatal = e
                    self.cond.notify_all()
                return
            else:
                self._acknowledged()
                pause = RETRY_S[0]
                continue
            with self.cond:
                if self.closed:
                    return
                self.cond.wait(pause)
            pause = min(pause * 2, RETRY_S[1])

    def _taken(self, batch: list[Metric]) -> bool:
        """After a failed request: whether the store took the batch all the same (log_batch is one
        transaction, and every row sent is newer than the step the store held for its key)."""
        last = batch[-1]
        return self.store.latest_steps(self.run_id).get(last.key, -1) >= last.step

    def _failed(self, started: float, error: str) -> None:
        with self.cond:
            self.uncertain = True
            first = self.outage_since is None
            if first:
                self.outage_since = started
                _outages.add(self.uri)
            rows = sum(len(b) for b, _ in self.queue)
            if self.gave_up is None and time.monotonic() - self.outage_since > self.limit:
                self._give_up("outage")
        if first:
            self.log.warning(
                "%s unreachable (%s); buffering metrics (%d rows) in %s; training continues for up to %g s",
                describe(self.uri), error, rows, self.journal.path, self.limit,
            )  # fmt: skip

    def _acknowledged(self) -> None:
        with self.cond:
            batch, size = self.queue.popleft()
            self.unsent_bytes -= size
            self.uncertain = False
            back, self.outage_since = self.outage_since, None
            if not self.queue:
                self.journal.delete()
            elif self.journal.size > max(2 * self.unsent_bytes, 2**20):  # keep the file near what is unsent
                self.journal.rewrite(b"".join(_lines(b) for b, _ in self.queue))
            rows = sum(len(b) for b, _ in self.queue)
            self.cond.notify_all()
        if back is not None:
            _outages.discard(self.uri)
            if self.http:
                _recovered_retries()
            self.log.info("%s answers again after %.0f s; sending the %d buffered metric rows",
                          describe(self.uri), time.monotonic() - back, rows + len(batch))  # fmt: skip

    def _message(self, step: int, checkpoint: Path | None) -> str:
        if self.gave_up == "full":
            why = (f"the metric buffer is full ({self.unsent_bytes:,} bytes of unsent rows, limit "
                   f"{self.buffer_bytes:,}) while {describe(self.uri)} is unreachable")  # fmt: skip
        else:
            why = (f"{describe(self.uri)} unreachable for {self.gave_up_after:.0f} s "
                   f"(limit {self.limit:g} s, {OUTAGE_ENV})")  # fmt: skip
        where = f"training stopped after step {step}" + (f", checkpoint {checkpoint}" if checkpoint else "")
        rows = sum(len(b) for b, _ in self.queue) + len(self.buffer)
        return (f"{why}; {where}; {rows} metric rows are kept in {self.journal.path} and sent when the run "
                "resumes: start the server again, then rerun the same command")  # fmt: skip

    def _close(self, wait: float) -> None:
        """Give the sender up to ``wait`` seconds to drain, then stop it; what is unsent stays on disk."""
        deadline = time.monotonic() + wait
        with self.cond:
            while self.queue and self.fatal is None and time.monotonic() < deadline:
                self.cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=REQUEST_TIMEOUT_S + 1)
        if self.http and not self.released:
            self.released = True
            _release_retries()
        if self.gave_up is None:  # after giving up, the rest of the run's calls to the server stay quiet
            _outages.discard(self.uri)

    def __enter__(self) -> MetricSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Training ended: send what is buffered (rows reported before a failure are kept too). After a normal
        end this waits for a server that is away, up to the limit; after a stop or an error it waits only
        while the server answers, and unsent rows stay on disk for the resume."""
        try:
            self._enqueue()
        except TrackingUnavailable:
            pass  # raised below, with where training stopped
        except Exception:  # e.g. a full disk: after another error, that error is the one to report
            if exc is None:
                self._close(0.0)
                raise
        with self.cond:
            while exc is None and self.queue and self.gave_up is None and self.fatal is None:
                self.cond.wait(0.2)
        self._close(0.0 if self.outage_since is not None or self.gave_up else REQUEST_TIMEOUT_S)
        if self.fatal is not None and exc is None:
            raise self.fatal
        if self.gave_up is not None and (isinstance(exc, TrainingInterrupted) or (exc is None and self.queue)):
            step, checkpoint = getattr(exc, "step", self.step), getattr(exc, "checkpoint", None)
            raise TrackingUnavailable(self._message(step, checkpoint), step, checkpoint) from exc
        if self.queue:
            self.log.warning("%d metric rows wait in %s for %s; they are sent when the run resumes",
                             sum(len(b) for b, _ in self.queue), self.journal.path, describe(self.uri))  # fmt: skip


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
