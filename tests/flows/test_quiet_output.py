"""What `lmp run` prints, with real processes: a user error is one line and exit 2, Ctrl-C stops at a checkpoint
(Prefect: Cancelled, MLflow: KILLED), a run's output carries no third-party noise, the summary says what the
gate decided, and flow runs are named PIPELINE-<digest8>-<time>."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

LMP = str(Path(sys.executable).with_name("lmp"))
MODEL = {"kind": "gpt", "num_layers": 1, "num_heads": 1, "embed_dim": 16, "context_length": 16}
TRAIN = {"batch_size": 2, "warmup_steps": 1, "eval_tokens": 64, "log_interval": 1, "precision": "fp32"}
MACBETH = {"source": "builtin", "plays": ["macbeth"], "max_chars": 20000}
NOISE = ("Add type hints", "Downloading artifacts", "Skip logging GPU", "Traceback", "Finished in state")


def _project(path: Path, name: str, data: dict, max_steps: int, **train) -> Path:
    spec = {"data": data, "model": MODEL, "eval": {"max_new_tokens": 4}}
    spec["train"] = TRAIN | {"max_steps": max_steps, "eval_interval": max_steps} | train
    path.mkdir(parents=True)
    (path / "pipelines.yaml").write_text(yaml.safe_dump({"default": name, "pipelines": {name: spec}}))
    return path


def _env(path: Path, **extra: str) -> dict:
    """The user's environment without any Prefect API or tracking store of ours; caches and temp files inside."""
    drop = ("PREFECT_API", "PREFECT_UI_URL", "MLFLOW_TRACKING", "LMP_DEBUG", "LMP_TEMPORARY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"TMPDIR": str(path), "XDG_CACHE_HOME": str(path / "cache"), "COLUMNS": "120"} | extra


def _lmp(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LMP, *args], cwd=path, env=_env(path, **env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect API server the test can still query after `lmp run` exits (its own temporary one dies with it)."""
    from flows.ops import prefect_server

    path = tmp_path_factory.mktemp("prefect")
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_UI_URL", "LMP_TEMPORARY_PREFECT_API")}
    os.environ["PREFECT_HOME"], home = str(path / "home"), os.environ.get("PREFECT_HOME")
    server = prefect_server.TemporaryServer(path / "server.log").start()
    try:
        server.ready()
        yield server.api_url
    finally:
        server.stop()
        for key, value in saved.items() | {("PREFECT_HOME", home)}:
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/flow_runs/filter", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _mlflow_runs(path: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path / 'mlruns' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_missing_data_file_is_one_line_and_exit_2_and_lmp_debug_shows_the_traceback(tmp_path):
    project = _project(tmp_path / "p", "nodata", {"source": "files", "paths": ["missing.txt"]}, 4)
    result = _lmp(project, "run")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert len(output.strip().splitlines()) <= 5, output
    assert "missing.txt" in output and "does not exist" in output
    assert "Traceback" not in output and "step 0/" not in output and "loss nan" not in output

    debug = _lmp(project, "run", LMP_DEBUG="1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_run_prints_no_third_party_noise_and_its_summary_says_what_the_gate_decided(tmp_path):
    project = _project(tmp_path / "p", "quiet", MACBETH, 4, eval_interval=2)
    result = _lmp(project, "run")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for noise in NOISE:
        assert noise not in output, noise
    assert output.count("View run") <= 1
    assert not re.search(r"View at http://127\.0\.0\.1:\d+/", output)  # the temporary server dies with `lmp run`
    [run] = _mlflow_runs(project, "quiet")
    gate = [line for line in result.stdout.splitlines() if "gate" in line]
    assert gate and "promoted to @champion" in gate[0] and "no champion yet" in gate[0], result.stdout
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in result.stdout.replace("\n", "")


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"lmp run exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)  # polling the file system, bounded by the deadline


def test_ctrl_c_stops_at_a_checkpoint_cancels_the_flow_run_and_kills_the_mlflow_run(tmp_path, prefect_api):
    project = _project(tmp_path / "p", "stoppable", MACBETH, 100_000, checkpoint_interval=5)
    with open(tmp_path / "lmp.log", "w") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(
            [LMP, "run"],
            cwd=project,
            env=_env(project, PREFECT_API_URL=prefect_api),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGINT to the group, as Ctrl-C in a terminal sends it
        )
    try:
        _wait_for(lambda: list(project.glob(".lmp/runs/*/step-*/MANIFEST.json")), proc, "first checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "lmp.log").read_text()
    assert code == 130, output
    assert re.search(r"stopped at step \d+, checkpoint \S+step-\d+; run again to resume", output), output
    assert "Traceback" not in output and "Finished in state" not in output

    [flow_run] = [r for r in _flow_runs(prefect_api) if r["name"].startswith("stoppable")]
    assert flow_run["state"]["type"] == "CANCELLED", flow_run["state"]
    assert re.fullmatch(r"stoppable-[0-9a-f]{8}-\d{8}-\d{6}", flow_run["name"]), flow_run["name"]
    [run] = _mlflow_runs(project, "stoppable")
    assert run.info.status == "KILLED"


def test_the_gate_verdict_says_what_happened_with_both_numbers():
    from flows.registry.promotion import Decision, verdict

    def decision(promoted, reason, challenger, champion, champion_version, **more):
        return Decision(promoted, reason, "val_bpc", challenger, champion, champion_version, **more)

    first = decision(True, "no champion yet", 2.5, None, None)
    assert verdict(first, 1) == "promoted to @champion (no champion yet; val_bpc 2.5)"
    better = decision(True, "…", 2.1, 2.15, 3, min_improvement=0.005)
    assert verdict(better, 4) == "promoted to @champion (val_bpc 2.1 < 2.15 of v3)"
    worse = decision(False, "…", 2.14, 2.15, 3, min_improvement=0.02)
    assert verdict(worse, 4) == (
        "stays @challenger because val_bpc 2.14 vs 2.15 of v3 (@champion) is not an improvement of at least 0.02"
    )
    same = decision(False, "version 1 is already @champion; nothing to promote", 2.5, None, 1)
    assert verdict(same, 1, created=False) == "version 1 is already @champion (same weights); nothing to promote"
    nan = decision(False, "challenger val_bpc is nan, not finite", float("nan"), 2.5, 1)
    assert verdict(nan, 2) == "stays @challenger because its val_bpc is nan, not finite (v1 stays @champion)"
    assert verdict(None, 2) == "stays @challenger (promote.auto is false: `lmp promote` runs the gate)"
