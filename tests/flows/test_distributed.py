"""Data-parallel training under torchrun (gloo on CPU): the same losses as one process, one MLflow run,
a killed rank fails the task with its number, and the next run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.config import load_pipelines

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))


def test_two_processes_match_one_process_and_log_one_run(store):
    """The smoke model with nproc_per_node 2 against the session store's single-process smoke run: same
    data, seed and global batch (8 = 2 ranks × 4 rows). Tolerance: 1e-4 nats on every logged train_loss —
    the two differ only in the order gradients are summed."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    smoke = load_pipelines(ROOT / "pipelines.yaml").get("smoke")
    ddp = smoke.overridden({"name": "smoke-ddp", "train.distributed": {"nproc_per_node": 2}})
    result = lm_pipeline(ddp, workdir=str(store / ".lmp"))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("smoke-ddp").experiment_id])
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    single = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], order_by=["start_time ASC"])[0]
    history = lambda run_id: {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}  # noqa: E731
    two, one = history(run.info.run_id), history(single.info.run_id)
    assert sorted(two) == sorted(one) == list(range(5, 41, 5))  # rank 0 alone logs: no duplicate steps
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert run.data.metrics["val_loss"] == pytest.approx(single.data.metrics["val_loss"], abs=1e-3)


def test_a_classifier_trains_distributed_like_one_process(store):
    """smoke-genre (fine-tuned from models:/smoke@champion) in one process and in two, head dropout off so both
    draw no random numbers: the same train_loss at every logged step (1e-4) and the same validation metrics."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    genre = load_pipelines(ROOT / "pipelines.yaml").get("smoke-genre")
    one = genre.overridden({"name": "genre-one", "head": {"pooling": "mean", "dropout": 0.0}})
    two = one.overridden({"name": "genre-two", "train.distributed": {"nproc_per_node": 2}})
    results = [lm_pipeline(spec, workdir=str(store / ".lmp")) for spec in (one, two)]
    client = MlflowClient()
    history = [{m.step: m.value for m in client.get_metric_history(r["run_id"], "train_loss")} for r in results]
    assert sorted(history[0]) == sorted(history[1]) == [5, 10, 15, 20]
    for step, value in history[0].items():
        assert history[1][step] == pytest.approx(value, abs=1e-4), step
    for key in ("val_macro_f1", "val_label_accuracy"):
        assert results[1]["metrics"][key] == pytest.approx(results[0]["metrics"][key], abs=1e-6), key


PIPELINE = {
    "default": "ddp",
    "pipelines": {
        "ddp": {
            "data": {"source": "builtin", "plays": ["macbeth"], "max_chars": 60000},
            # An LSTM reading contiguous streams: each rank carries its rows' state, and the checkpoint holds all.
            "model": {"kind": "lstm", "num_layers": 1, "embed_dim": 32, "hidden_dim": 64, "context_length": 32},
            "train": {
                "max_steps": 400,
                "batch_size": 16,
                "batching": "streams",
                "warmup_steps": 10,
                "eval_interval": 200,
                "eval_tokens": 1024,
                "log_interval": 1,
                "checkpoint_interval": 50,
                "precision": "fp32",
                "distributed": {"nproc_per_node": 2},
            },  # fmt: skip
            "eval": {"max_new_tokens": 8},
        }
    },
}


def _rank_process(root: psutil.Process, rank: int) -> psutil.Process | None:
    for child in root.children(recursive=True):
        try:
            if "flows.ddp_worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_fails_the_task_by_name_and_the_next_run_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(PIPELINE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env["TMPDIR"] = str(tmp_path)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([LMP, "run"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / ".lmp" / "runs").glob("*/step-00000050/MANIFEST.json")):
            rank = _rank_process(psutil.Process(proc.pid), 1)
            if rank is not None:
                rank.send_signal(signal.SIGKILL)
                killed = rank.pid
        time.sleep(0.02)  # polling for the checkpoint, bounded by the deadline
    assert killed, "training finished or timed out before the first checkpoint"
    assert proc.wait(timeout=120) != 0
    output = (tmp_path / "first.log").read_text()
    assert "distributed training failed — rank 1 failed (exit code -9" in " ".join(output.split())

    second = subprocess.run([LMP, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed" in second.stdout
    from flows import tracking

    tracking.configure_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and int(run.data.tags["lmp.resumed_from_step"]) >= 50
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, 401)) and len(steps) == len(set(steps))  # no gap, no duplicate
    assert "train: resuming from" in second.stdout + second.stderr


SUMMARY = """[rank0]: RuntimeError: [gloo/pair.cc:537] Read error [127.0.0.1]:9601: Connection reset by peer.
[rank1]: lm.training.TrainingError: non-finite loss or gradient norm on 5 steps
============================================================
flows.ddp_worker FAILED
------------------------------------------------------------
Failures:
[0]:
  time      : 2026-11-28_17:53:25
  rank      : {second_rank} (local_rank: {second_rank})
  exitcode  : {second_code} (pid: 22904)
  traceback : {second_traceback}
------------------------------------------------------------
Root Cause (first observed failure):
[1]:
  time      : 2026-11-28_17:53:24
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 22903)  (SIGTERM)
  traceback : Traceback (most recent call last):
============================================================
"""


@pytest.mark.parametrize(
    ("second_rank", "second_code", "second_traceback", "expected"),
    [
        (1, "-9", "Signal 9 (SIGKILL) received by PID 22904", "rank 1 failed (exit code -9 (pid: 22904)): Signal 9"),
        (1, "1", "Traceback (most recent call last):", "rank 1 failed (exit code 1 (pid: 22904)): lm.training.Train"),
    ],
)
def test_the_failing_rank_is_named_even_when_torchrun_blames_the_peer_that_lost_it(
    second_rank, second_code, second_traceback, expected
):
    from flows.torchrun import root_cause

    log = SUMMARY.format(second_rank=second_rank, second_code=second_code, second_traceback=second_traceback)
    assert root_cause(log).startswith(expected)


def test_sigterm_stops_every_rank_at_a_checkpoint_and_the_rerun_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows import tracking

    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(PIPELINE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env["TMPDIR"] = str(tmp_path)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([LMP, "run"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / ".lmp" / "runs").glob("*/step-00000050/MANIFEST.json")):
            break
        time.sleep(0.02)  # polling for the checkpoint, bounded by the deadline
    proc.send_signal(signal.SIGTERM)  # to the CLI only, as a service manager would
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    said = " ".join((tmp_path / "first.log").read_text().split())
    assert "stopped at step" in said and "run again to resume" in said and "Traceback" not in said

    tracking.configure_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "KILLED"
    stopped_at = max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert list((tmp_path / ".lmp" / "runs" / run.info.run_id).glob(f"step-{stopped_at:08d}/MANIFEST.json"))

    second = subprocess.run([LMP, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    [again] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert again.info.status == "FINISHED" and again.data.tags["lmp.resumed_from_step"] == str(stopped_at)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 401))
