"""A real `mlflow server` killed mid-run: training keeps going on a bounded on-disk buffer of metric rows;
restarted within the limit, every row arrives once; gone past the limit, the run stops at a checkpoint
with one message naming the server, and the buffered rows are sent when the run resumes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows import tracking
from lm.checkpoint import latest_checkpoint
from lm.config import GPTConfig, TrainConfig
from lm.models import build_model
from lm.training import train
from tests.flows.helpers import free_port

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
KEYS = ("train_loss", "learning_rate", "grad_norm", "tokens_per_second")


class Server:
    """`mlflow server` on its own sqlite store and a fixed port, so a restart is the same server."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120.0) -> None:
        args = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]  # fmt: skip
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                            "TMPDIR": str(self.root / "tmp")}  # fmt: skip
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{self.url} did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its worker), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its workers outlive the parent for a few seconds
        except (ProcessLookupError, AttributeError):
            pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (each test kills it and starts it again): start-up costs seconds."""
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(mlflow_server, tmp_path, monkeypatch):
    """The running server, tracking pointed at it, the working directory in tmp_path (the sink's buffer
    lives under ./.lmp/runs/<run_id>/)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
        mlflow_server.start()
    tracking.configure_uri(mlflow_server.url)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


def _new_run() -> str:
    client = MlflowClient()
    return client.create_run(client.create_experiment(f"outage-{time.monotonic_ns()}")).info.run_id


def _history(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Retrying" in r.getMessage()]


def test_server_killed_and_restarted_within_the_limit_loses_no_metric_row(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMP_TRACKING_OUTAGE_SECONDS", "120")
    caplog.set_level(logging.INFO)
    run_id = _new_run()
    journal = tmp_path / ".lmp" / "runs" / run_id / "metrics-buffer.jsonl"
    restarted, seen = threading.Event(), {"buffered": False, "slowest": 0.0, "last": 0}

    def restart() -> None:
        server.start()
        restarted.set()

    def training() -> None:  # a fake training loop: a step every few ms, a checkpoint every 10 steps
        with tracking.MetricSink(run_id, flush_rows=20, flush_seconds=0.2) as sink:
            step, back_at = 0, None
            while back_at is None or step < back_at + 40:
                step += 1
                started = time.monotonic()
                sink(step, {"train_loss": 10 / step, "tokens_per_second": 1000.0 + step})
                if step % 10 == 0:
                    sink.flush()  # before_checkpoint
                if step > 40 and not restarted.is_set():  # the server is away
                    seen["slowest"] = max(seen["slowest"], time.monotonic() - started)
                    seen["buffered"] |= journal.exists()
                if step == 40:
                    server.kill()
                    threading.Thread(target=restart, daemon=True).start()
                if back_at is None and restarted.is_set():
                    back_at = step
                time.sleep(0.005)  # the step's compute
            seen["last"] = step

    runner = threading.Thread(target=training, daemon=True)
    runner.start()
    runner.join(timeout=150)
    assert not runner.is_alive(), "training blocked behind the metric flush while the server was away"
    assert seen["buffered"], "no metric rows were buffered on disk while the server was away"
    assert seen["slowest"] < 1.0, f"a metric call held training for {seen['slowest']:.1f} s while the server was away"
    steps = list(range(1, seen["last"] + 1))
    for key in ("train_loss", "tokens_per_second"):
        assert _history(run_id, key) == steps  # every step once: no gap, no duplicate
    assert not journal.exists()  # drained, then deleted
    assert _retry_lines(caplog) == []  # no flood of urllib3 retry lines
    outage = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage) == 1 and server.url in outage[0] and "buffering metrics" in outage[0], outage


def test_server_gone_past_the_limit_stops_at_a_checkpoint_then_the_resume_sends_every_row(
    server, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("LMP_TRACKING_OUTAGE_SECONDS", "3")
    caplog.set_level(logging.INFO)
    run_id = _new_run()
    out = tmp_path / ".lmp" / "runs" / run_id
    journal = out / "metrics-buffer.jsonl"
    model = build_model(GPTConfig(num_layers=1, num_heads=2, embed_dim=16, context_length=16), vocab_size=32)
    tokens = np.random.default_rng(0).integers(0, 32, 4000).astype(np.uint16)
    cfg = TrainConfig(max_steps=10**6, batch_size=2, warmup_steps=0, eval_interval=10**6, eval_tokens=64,
                      log_interval=1, precision="fp32", device="cpu", seed=0)  # fmt: skip
    killed = {}
    with pytest.raises(tracking.TrackingUnavailable) as stopped:
        with tracking.MetricSink(run_id, flush_seconds=0.2) as sink:

            def report(step: int, metrics) -> None:
                sink(step, metrics)
                if step == 20:
                    server.kill()
                    killed["at"] = time.monotonic()

            train(model, tokens, tokens[:500], cfg, on_metrics=report, checkpoint_dir=out,
                  before_checkpoint=lambda step: sink.flush(), should_stop=sink.should_stop)  # fmt: skip
    assert time.monotonic() - killed["at"] < 30
    error = stopped.value
    message = str(error)
    assert server.url in message and "unreachable" in message and "checkpoint" in message, message
    checkpoint, _ = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint == error.checkpoint and error.step > 20
    assert journal.exists() and str(journal) in message
    assert _retry_lines(caplog) == []

    # The server returns; the resumed run's sink sends the buffered rows first, once each.
    server.start()
    with tracking.MetricSink(run_id, resuming=True):
        pass
    for key in KEYS:
        assert _history(run_id, key) == list(range(1, error.step + 1)), key
    assert not journal.exists()
