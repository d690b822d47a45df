"""Crash and resume with real processes: SIGKILL `lmp run` mid-training, run it again, and get the same
MLflow run, a metric history without gaps or duplicates, and weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

PIPELINE = {
    "default": "crashy",
    "pipelines": {
        "crashy": {
            "data": {"source": "builtin", "plays": ["macbeth"], "max_chars": 60000},
            "model": {"kind": "gpt", "num_layers": 2, "num_heads": 2, "embed_dim": 64, "context_length": 64},
            "train": {
                "max_steps": 300,
                "batch_size": 16,
                "warmup_steps": 10,
                "eval_interval": 100,
                "eval_tokens": 1024,
                "log_interval": 1,
                "checkpoint_interval": 50,
                "precision": "fp32",
            },
            "eval": {"max_new_tokens": 8},
        }
    },
}
LMP = str(Path(sys.executable).with_name("lmp"))


def _project(path: Path) -> Path:
    path.mkdir()
    (path / "pipelines.yaml").write_text(yaml.safe_dump(PIPELINE))
    return path


def _env(path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return env | {"TMPDIR": str(path)}


def _run(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LMP, "run", *args], cwd=path, env=_env(path), capture_output=True, text=True, timeout=300)


def _final_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    [final] = list((path / ".lmp" / "runs").glob("*/final/model.safetensors"))
    return load_file(str(final))


def _runs(path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    return client, client.search_runs([client.get_experiment_by_name("crashy").experiment_id])


def _start_until_checkpoint(project: Path, step: int) -> tuple[subprocess.Popen, Path]:
    """Start `lmp run` in its own session and return once its step checkpoint is complete."""
    with open(project / "lmp.log", "w") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(
            [LMP, "run"], cwd=project, env=_env(project), start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
    deadline, found = time.monotonic() + 240, []
    while not found and time.monotonic() < deadline and proc.poll() is None:
        found = list((project / ".lmp" / "runs").glob(f"*/step-{step:08d}/MANIFEST.json"))
        time.sleep(0.02)  # polling the file system for the checkpoint, bounded by the deadline
    assert found, f"training finished or timed out before the checkpoint at step {step}"
    return proc, found[0]


def _kill_after_checkpoint(project: Path, step: int) -> Path:
    """SIGKILL the CLI and the Prefect server it started once the step checkpoint is complete."""
    proc, found = _start_until_checkpoint(project, step)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return found


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory) -> Path:
    """An uninterrupted run of the crash pipeline to compare resumed runs with."""
    path = _project(tmp_path_factory.mktemp("golden") / "p")
    golden = _run(path)
    assert golden.returncode == 0, golden.stderr[-2000:]
    return path


def _assert_resumed_like_golden(crash_dir: Path, golden_dir: Path, run_id: str) -> None:
    client, runs = _runs(crash_dir)
    assert [r.info.run_id for r in runs] == [run_id]  # the same MLflow run, continued
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == list(range(1, 301))  # no gap, no duplicate
    for name, tensor in _final_weights(golden_dir).items():
        assert (tensor == _final_weights(crash_dir)[name]).all(), name


def test_sigkill_mid_training_then_rerun_resumes_bit_identically(tmp_path, golden_dir):
    crash_dir = _project(tmp_path / "crash")
    checkpoint = _kill_after_checkpoint(crash_dir, 150)
    assert not (crash_dir / ".lmp" / "runs" / checkpoint.parent.parent.name / "final").exists()

    client, [run] = _runs(crash_dir)
    assert run.info.status == "RUNNING"  # what a hard kill leaves behind

    resumed = _run(crash_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout

    _assert_resumed_like_golden(crash_dir, golden_dir, run.info.run_id)


KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import lm.checkpoint as checkpoint
real_save_file = checkpoint.save_file
def save_file(tensors, path, *args, **kwargs):  # the optimizer/RNG tensors: written after the weights
    real_save_file(tensors, path, *args, **kwargs)
    if "step-00000150" in str(path):  # the third checkpoint: die before its manifest and rename
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_file
from flows.cli.commands import main
sys.argv = ["lmp", "run"]
main()
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, golden_dir):
    crash_dir = _project(tmp_path / "crash")
    crashed = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE], cwd=crash_dir, env=_env(crash_dir),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL
    runs_dir = crash_dir / ".lmp" / "runs"
    [run_dir] = list(runs_dir.iterdir())
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-")) == ["step-00000050", "step-00000100"]
    assert [p for p in run_dir.iterdir() if "150" in p.name], "the half-written checkpoint is left in its temp dir"

    resumed = _run(crash_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_resumed_like_golden(crash_dir, golden_dir, run_dir.name)
    client, [run] = _runs(crash_dir)
    assert run.data.tags["lmp.resumed_from_step"] == "100"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # the leftover temp dir is cleaned up


def test_resume_is_refused_when_the_model_changed_and_fresh_starts_over(tmp_path):
    project = _project(tmp_path / "p")
    _kill_after_checkpoint(project, 50)

    changed = yaml.safe_load((project / "pipelines.yaml").read_text())
    changed["pipelines"]["crashy"]["model"]["embed_dim"] = 32
    (project / "pipelines.yaml").write_text(yaml.safe_dump(changed))
    refused = _run(project)
    assert refused.returncode == 2
    assert "model.embed_dim" in " ".join(refused.stderr.split()) and "--fresh" in refused.stderr

    fresh = _run(project, "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    client, runs = _runs(project)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_sigterm_finishes_the_step_checkpoints_marks_killed_and_the_rerun_resumes(tmp_path):
    project = _project(tmp_path / "p")
    proc, _ = _start_until_checkpoint(project, 50)
    proc.send_signal(signal.SIGTERM)  # to the CLI only, as a service manager would
    proc.wait(timeout=120)
    err = (project / "lmp.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    said = " ".join(err.split())
    assert "stopped at step" in said and "run again to resume" in said and "Traceback" not in said

    client, [run] = _runs(project)
    assert run.info.status == "KILLED"
    stopped_at = max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert list((project / ".lmp" / "runs" / run.info.run_id).glob(f"step-{stopped_at:08d}/MANIFEST.json"))

    resumed = _run(project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client, [again] = _runs(project)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["lmp.resumed_from_step"] == str(stopped_at)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 301))


def test_only_settings_that_change_training_block_a_resume():
    from flows.resume import changed_keys

    old = {"model.num_layers": "2", "train.max_steps": "300", "eval.max_new_tokens": "8", "promote.metric": "val_bpc"}
    now = {"model.num_layers": 2, "train.max_steps": 900, "eval.max_new_tokens": 64, "promote.metric": "val_loss"}
    assert changed_keys(old, now) == []  # schedule, evaluation and promotion keys may change
    assert changed_keys(old, now | {"model.num_layers": 4}) == ["model.num_layers"]


KILL_IN_EVALUATE = """
import os, signal, sys
import lm.stages as stages
def evaluate(*args, **kwargs):  # training has finished and written final/: die while evaluating
    os.kill(os.getpid(), signal.SIGKILL)
stages.evaluate = evaluate
from flows.cli.commands import main
sys.argv = ["lmp", "run"]
main()
"""


def test_sigkill_in_evaluation_then_pid_reuse_resumes_from_final_without_training_again(tmp_path):
    project = _project(tmp_path / "p")
    short = yaml.safe_load((project / "pipelines.yaml").read_text())
    short["pipelines"]["crashy"]["train"] |= {"max_steps": 40, "checkpoint_interval": 20, "eval_interval": 20}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(short))
    crashed = subprocess.run(
        [sys.executable, "-c", KILL_IN_EVALUATE], cwd=project, env=_env(project),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    client, [run] = _runs(project)
    run_id, run_dir = run.info.run_id, project / ".lmp" / "runs" / run.info.run_id
    assert run.info.status == "RUNNING" and (run_dir / "final").is_dir()
    assert not list(run_dir.glob("step-*"))  # training finished: its step checkpoints are gone
    weights = (run_dir / "final" / "model.safetensors").read_bytes()
    before = {key: client.get_metric_history(run_id, key) for key in ("train_loss", "wall_seconds")}
    # The killed process's pid now belongs to another live process (this one), started at another time.
    client.set_tag(run_id, "lmp.pid", str(os.getpid()))

    resumed = _run(project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout
    client, [again] = _runs(project)
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert again.data.tags["lmp.resumed_from_step"] == "40"
    after = {key: client.get_metric_history(run_id, key) for key in before}
    assert [(m.step, m.value) for m in after["train_loss"]] == [(m.step, m.value) for m in before["train_loss"]]
    assert [m.step for m in after["wall_seconds"]] == [40]  # logged once, by the attempt that trained
    assert (run_dir / "final" / "model.safetensors").read_bytes() == weights and not list(run_dir.glob("step-*"))
    assert "val_loss" in again.data.metrics and "lmp.failure" not in again.data.tags


def test_plan_shows_the_resume_the_next_run_would_make_without_changing_the_store(tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient

    from flows.config import parse_pipelines
    from flows.resume import pending_resume, process_tags
    from lm.checkpoint import save_checkpoint
    from lm.config import flatten
    from lm.plan import plan

    spec = parse_pipelines(yaml.safe_dump(PIPELINE)).get("crashy")
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / ".lmp"
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert pending_resume(spec, workdir, uri) is None and not (tmp_path / "mlruns").exists()  # no store created
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(uri)
    experiment = client.create_experiment("crashy")
    run = client.create_run(experiment, tags=process_tags() | {"lmp.pid": "999999999"})  # a killed process
    params = flatten(spec.model_dump(mode="json", exclude={"name"}, exclude_none=True))
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    save_checkpoint(workdir / "runs" / run.info.run_id / "step-00000322", torch.nn.Linear(2, 2), {"step": 322})

    pending = pending_resume(spec, workdir, uri)
    assert (pending.run_id, pending.step, pending.refused) == (run.info.run_id, 322, None)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # plan reconciles nothing
    rows = {s.stage: s for s in plan("crashy", spec.data, spec.tokenizer, workdir=workdir, base_dir=tmp_path,
                                     resume=pending)}  # fmt: skip
    assert (rows["train"].status, rows["train"].reason) == (
        "resume",
        f"resume from step 322 of run {run.info.run_id[:8]}",
    )

    changed = parse_pipelines(yaml.safe_dump(PIPELINE).replace("embed_dim: 64", "embed_dim: 32")).get("crashy")
    refused = pending_resume(changed, workdir, uri)
    rows = {s.stage: s for s in plan("crashy", spec.data, spec.tokenizer, workdir=workdir, base_dir=tmp_path,
                                     resume=refused)}  # fmt: skip
    assert rows["train"].status == "refused" and "model.embed_dim" in rows["train"].reason
    assert "--fresh" in rows["train"].reason
