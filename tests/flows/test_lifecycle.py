"""The run lifecycle: a run left RUNNING is told from a live one by its process's start time (pid reuse);
a failure after training resumes from ``final/`` into evaluation and registration without training again;
tags of earlier attempts go when the run finishes."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import load_pipelines

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]


def _spec():
    """The smoke pipeline, smaller still: two runs of it fit in a few seconds."""
    spec = load_pipelines(ROOT / "pipelines.yaml").get("smoke")
    train = {"max_steps": 30, "checkpoint_interval": 10, "log_interval": 5, "eval_interval": 30, "eval_tokens": 512}
    return spec.overridden(
        {"data.max_chars": 30000, "eval.prompts": [], "eval.max_new_tokens": 8}
        | {f"train.{key}": value for key, value in train.items()}
    )


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # machine-wide training slots of our own


def test_a_running_run_whose_pid_now_belongs_to_another_process_is_stale(mlflow_store):
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from flows.resume import HOST_TAG, PID_TAG, START_TAG, process_tags, reconcile_stale, start_time

    client = MlflowClient()
    exp = tracking.experiment_id(client, "lifecycle", mlflow_store)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = {PID_TAG: str(child.pid), HOST_TAG: socket.gethostname(), START_TAG: start_time(child.pid)}
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        runs = {
            "alive": live,
            "reused": live | {START_TAG: "ticks:1"},  # the pid now names a process that started later
            "gone": {PID_TAG: gone.stdout.strip(), HOST_TAG: socket.gethostname()},
            "elsewhere": live | {HOST_TAG: "another-host"},
            "this": process_tags(),
        }
        ids = {name: client.create_run(exp, tags=tags).info.run_id for name, tags in runs.items()}
        stale = reconcile_stale(client, exp)
        assert sorted(stale) == sorted([ids["reused"], ids["gone"]])
        status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
        assert status == {"alive": "RUNNING", "reused": "KILLED", "gone": "KILLED", "elsewhere": "RUNNING",
                          "this": "RUNNING"}  # fmt: skip
    finally:
        child.communicate(b"")


def test_pid_reuse_then_rerun_resumes_the_interrupted_run_and_clears_its_stale_tag(
    prefect_harness, mlflow_store, own_cache, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flows import resume as resume_mod
    from flows.pipeline import lm_pipeline
    from lm.training import TrainingInterrupted

    spec, workdir = _spec(), str(tmp_path / ".lmp")
    calls = itertools.count(1)
    with monkeypatch.context() as m:  # a stop request after step 15: a step checkpoint, the run KILLED
        m.setattr(resume_mod.STOP, "requested", lambda: next(calls) >= 15)
        with pytest.raises(TrainingInterrupted):
            lm_pipeline(spec, workdir=workdir)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "KILLED" and "lmp.stopped" in run.data.tags
    # What a hard kill leaves (RUNNING), recorded by a process whose pid is alive again — this one — but
    # which started at another time: the pid was reused.
    client.update_run(run.info.run_id, status="RUNNING")
    client.set_tag(run.info.run_id, "lmp.pid", str(os.getpid()))
    client.set_tag(run.info.run_id, "lmp.pid_start", "ticks:1")

    result = lm_pipeline(spec, workdir=workdir)
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id] == [result["run_id"]]
    again = runs[0]
    assert again.info.status == "FINISHED" and result["resumed_from_step"] == 15
    assert _steps(client, run.info.run_id, "train_loss") == list(range(5, 31, 5))  # no gap, no duplicate
    assert "lmp.stopped" not in again.data.tags and "lmp.failure" not in again.data.tags
    assert again.data.tags["lmp.pid_start"] == resume_mod.start_time(os.getpid())  # this attempt's process


def test_a_failure_after_training_resumes_from_final_without_training_again(
    prefect_harness, mlflow_store, own_cache, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline
    from lm.tasks.language_model import LanguageModel

    spec, workdir = _spec(), str(tmp_path / ".lmp")
    with monkeypatch.context() as m:
        m.setattr(LanguageModel, "evaluate", _disk_full)
        with pytest.raises(OSError, match="No space left"):
            lm_pipeline(spec, workdir=workdir)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["lmp.failure"]
    assert [p.name for p in (Path(workdir) / "runs" / run_id).glob("step-*")] == []  # only final/ is left
    before = {key: _steps(client, run_id, key) for key in ("train_loss", "tokens_per_second", "wall_seconds")}

    monkeypatch.setattr(LanguageModel, "fit", _no_training)
    result = lm_pipeline(spec, workdir=workdir)
    [again] = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == result["run_id"] == run_id and again.info.status == "FINISHED"
    assert result["resumed_from_step"] == 30 and result["train"]["steps"] == 30
    after = {key: _steps(client, run_id, key) for key in before}
    assert after == before and before["wall_seconds"] == [30]  # nothing trained or logged again
    assert "val_loss" in again.data.metrics and int(result["registered"]["version"]) == 1
    assert "lmp.failure" not in again.data.tags


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _no_training(*args, **kwargs):
    raise AssertionError("training ran again although it had finished")
