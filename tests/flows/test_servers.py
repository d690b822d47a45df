"""Real servers and real processes: `lmp up`/`lmp down`, a scheduled run served by `lmp schedule`, and two
`lmp run`s at once sharing one store and taking turns to train."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(path: Path, **smoke) -> Path:
    path.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    config["pipelines"]["smoke"].update(smoke)
    (path / "pipelines.yaml").write_text(yaml.safe_dump(config))
    return path


def _env(path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return env | {"TMPDIR": str(path), "XDG_CACHE_HOME": str(path / "cache")} | extra


def _lmp(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LMP, *args], cwd=path, env=_env(path, **env), capture_output=True, text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _completed_runs(api: str) -> list[dict]:
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    request = urllib.request.Request(
        f"{api}/flow_runs/filter", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [run for run in json.loads(response.read()) if run.get("deployment_id")]


def test_up_schedule_a_run_then_down_leaves_nothing_behind(tmp_path):
    project = _project(tmp_path / "p", schedule={"interval": 5})
    prefect_port, mlflow_port = _free_port(), _free_port()
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    started = _lmp(project, "up", *ports)
    assert started.returncode == 0, started.stderr
    assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in started.stdout
    state = json.loads((project / ".lmp" / "servers.json").read_text())
    pids = [s["pid"] for s in state["servers"].values()]
    scheduler = None
    try:
        again = _lmp(project, "up", *ports)
        assert again.returncode == 2 and "still running" in again.stderr and "lmp down" in again.stderr

        with open(project / "schedule.log", "w") as log:
            scheduler = subprocess.Popen(
                [LMP, "schedule", "smoke"], cwd=project, env=_env(project, PREFECT_RUNNER_POLL_FREQUENCY="1"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        api, deadline, runs = f"http://127.0.0.1:{prefect_port}/api", time.monotonic() + 240, []
        while not runs and time.monotonic() < deadline and scheduler.poll() is None:
            runs = _completed_runs(api)
            time.sleep(0.5)  # bounded poll of the real server for the scheduled run's outcome
        assert runs, (project / "schedule.log").read_text()[-3000:]
        assert runs[0]["name"].startswith("smoke-")  # named after the pipeline and its data digest

        listing = _lmp(project, "schedule", "--list")
        assert listing.returncode == 0 and "smoke" in listing.stdout

        from mlflow.tracking import MlflowClient

        client = MlflowClient(
            tracking_uri=f"http://127.0.0.1:{mlflow_port}", registry_uri=f"http://127.0.0.1:{mlflow_port}"
        )
        finished = [r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
                    if r.info.status == "FINISHED"]  # fmt: skip
        assert finished and finished[0].data.tags["prefect.flow_run_url"].startswith(f"http://127.0.0.1:{prefect_port}")
        assert client.search_model_versions("name = 'smoke'")
    finally:
        if scheduler is not None:
            os.killpg(scheduler.pid, signal.SIGINT)
            try:
                scheduler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(scheduler.pid, signal.SIGKILL)
                scheduler.wait()
        stopped = _lmp(project, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert not [pid for pid in pids if _alive(pid)]
    assert not (project / ".lmp" / "servers.json").exists()


def test_down_after_the_servers_were_killed_is_clean(tmp_path):
    project = _project(tmp_path / "p")
    ports = ["--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port())]
    assert _lmp(project, "up", *ports).returncode == 0
    state = json.loads((project / ".lmp" / "servers.json").read_text())
    for server in state["servers"].values():
        os.killpg(server["pid"], signal.SIGKILL)
    for server in state["servers"].values():
        deadline = time.monotonic() + 30
        while _alive(server["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)  # the kernel reaps them (they are not our children)
    stopped = _lmp(project, "down")
    assert stopped.returncode == 0 and "already stopped" in stopped.stdout
    assert _lmp(project, "down").returncode == 2  # nothing recorded any more


def test_two_runs_at_once_share_the_store_and_take_turns_to_train(tmp_path):
    from mlflow.tracking import MlflowClient

    project = _project(tmp_path / "p")
    env = _env(project)
    procs = [
        subprocess.Popen([LMP, "run", "smoke"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    try:
        client = MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
        spans = []
        for run in runs:
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert [m.step for m in history] == list(range(5, 41, 5))  # every row of both runs
            spans.append((min(m.timestamp for m in history), max(m.timestamp for m in history)))
        (a_start, a_end), (b_start, b_end) = sorted(spans)
        assert a_end <= b_start  # one trained after the other
    finally:
        mlflow.set_tracking_uri(None)
