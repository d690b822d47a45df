"""One store whether or not the servers are up: a pipeline first tracked through `lmp up`'s MLflow server runs,
generates and shows its artifacts in `lmp ui` after `lmp down`, and one first tracked in the embedded store runs
through the server — real servers, real `lmp` processes, one project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.flows.helpers import free_port, http

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))


def _project(path: Path) -> Path:
    """Two copies of a smaller `smoke` (10 steps on 60k characters), both scheduled: `a` meets the server first,
    `b` the embedded store."""
    path.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    tiny = config["pipelines"]["smoke"]
    tiny["data"] = {**tiny["data"], "max_chars": 60000}
    tiny["train"] |= {"max_steps": 10, "eval_interval": 10, "log_interval": 5, "eval_tokens": 512}
    tiny["eval"] = {**tiny["eval"], "max_new_tokens": 16, "prompts": []}
    tiny["schedule"] = {"interval": 3600}  # runs are asked for below, not waited for
    config["pipelines"], config["default"] = {"a": tiny, "b": dict(tiny)}, "a"
    (path / "pipelines.yaml").write_text(yaml.safe_dump(config))
    return path


def _env(path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return env | {"TMPDIR": str(path.parent), "XDG_CACHE_HOME": str(path.parent / "cache")} | extra


def _lmp(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LMP, *args], cwd=path, env=_env(path), capture_output=True, text=True, timeout=300)


def _http(url: str, method: str = "GET", body: dict | None = None, **headers: str) -> tuple[int, str]:
    status, _, text = http(url, method, body, **headers)
    return status, text


def _prefect(api: str, path: str, body: dict | None = None):
    """A Prefect API call with the CSRF token `lmp up`'s server wants for changes; the decoded answer."""
    _, token = _http(f"{api}/csrf-token?client=one-store")
    csrf = {"Prefect-Csrf-Token": json.loads(token)["token"], "Prefect-Csrf-Client": "one-store"}
    status, text = _http(f"{api}{path}", "POST" if body is not None else "GET", body, **csrf)
    assert status in (200, 201), text
    return json.loads(text)


def _poll(what: str, check, deadline_s: float, log: Path | None = None):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)  # bounded poll of a real server
    raise AssertionError(f"{what} within {deadline_s} s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def _stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _served_runs(project: Path, pipelines: list[str]) -> None:
    """`lmp up`, `lmp schedule` serving ``pipelines``, one flow run of each asked for through the Prefect API and
    waited for, then `lmp down`."""
    prefect_port, mlflow_port = free_port(), free_port()
    up = _lmp(project, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
    assert up.returncode == 0, up.stderr
    api, log, scheduler = f"http://127.0.0.1:{prefect_port}/api", project / "schedule.log", None
    try:
        with open(log, "w") as out:
            scheduler = subprocess.Popen(
                [LMP, "schedule", *pipelines, "--limit", "1"], cwd=project,
                env=_env(project, PREFECT_RUNNER_POLL_FREQUENCY="1"), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deployments = _poll(
            "`lmp schedule` registered its deployments",
            lambda: len(found := _prefect(api, "/deployments/filter", {})) == len(pipelines) and found,
            120,
            log,
        )
        runs = [_prefect(api, f"/deployments/{d['id']}/create_flow_run", {}) for d in deployments]

        def finished():
            states = [_prefect(api, f"/flow_runs/{r['id']}")["state"]["type"] for r in runs]
            assert not set(states) & {"FAILED", "CRASHED", "CANCELLED"}, (states, log.read_text()[-3000:])
            return states == ["COMPLETED"] * len(runs)

        _poll("the scheduled runs completed", finished, 240, log)
    finally:
        try:
            if scheduler is not None:
                _stop(scheduler)
        finally:
            down = _lmp(project, "down")
    assert down.returncode == 0, down.stderr


def _artifacts(base: str, run_id: str, path: str = "") -> list[str]:
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    status, text = _http(f"{base}/ajax-api/2.0/mlflow/artifacts/list?{query}")
    assert status == 200, text
    return [f["path"] for f in json.loads(text).get("files", [])]


def test_a_pipeline_moves_between_the_local_servers_and_the_embedded_store_either_way(tmp_path):
    project = _project(tmp_path / "p")
    first = _lmp(project, "run", "b")  # b: embedded store first
    assert first.returncode == 0, first.stderr[-3000:]

    _served_runs(project, ["a", "b"])  # a: the server first; b: the server second

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    artifacts = (project / "mlruns" / "artifacts").resolve().as_uri()
    for name in ("a", "b"):
        location = client.get_experiment_by_name(name).artifact_location
        assert location == artifacts or location.startswith(artifacts + "/"), location  # a file, no server needed

    after = _lmp(project, "run", "a")  # a: embedded store second
    assert after.returncode == 0, after.stderr[-3000:]

    port = free_port()
    with open(tmp_path / "ui.log", "w") as out:  # starting while `lmp generate` runs
        ui = subprocess.Popen([LMP, "ui", "--port", str(port)], cwd=project, env=_env(project), stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        generated = _lmp(project, "generate", "models:/a@champion", "ROMEO:", "--max-new-tokens", "8")
        assert generated.returncode == 0 and generated.stdout.startswith("ROMEO:"), generated.stderr[-3000:]
        base = f"http://127.0.0.1:{port}"
        _poll("`lmp ui` answered", lambda: _healthy(base), 90, tmp_path / "ui.log")
        runs = {name: client.search_runs([client.get_experiment_by_name(name).experiment_id]) for name in "ab"}
        assert [len(runs["a"]), len(runs["b"])] == [2, 2]
        for run in runs["a"] + runs["b"]:
            assert run.info.status == "FINISHED"
            listed = _artifacts(base, run.info.run_id)
            assert "samples" in listed and "model_card.md" in listed, (run.info.run_name, listed)
            status, sample = _http(f"{base}/get-artifact?path=samples/sample.txt&run_uuid={run.info.run_id}")
            assert status == 200 and sample.startswith("ROMEO:"), sample[:200]
    finally:
        _stop(ui, signal.SIGTERM)


def test_a_store_an_older_lmp_up_left_with_mlflow_artifacts_roots_is_repaired_in_place(tmp_path, monkeypatch):
    """Before its file artifact root, `lmp up`'s server gave new experiments ``mlflow-artifacts:/N`` (what the
    server resolves to ``mlruns/artifacts/N``): the embedded store reads them after the repair, same bytes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    port = free_port()
    old_up = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{database}",
        "--artifacts-destination", str(tmp_path / "mlruns" / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = _env(tmp_path / "p") | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "server.log", "w") as out:
        server = subprocess.Popen(old_up, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _poll("the MLflow server answered", lambda: _healthy(base), 90, tmp_path / "server.log")
        client = MlflowClient(tracking_uri=base)
        exp = client.create_experiment("old")
        run = client.create_run(exp)
        client.log_text(run.info.run_id, "kept as it was", "notes/note.txt")
        client.set_terminated(run.info.run_id)
        assert client.get_experiment(exp).artifact_location == f"mlflow-artifacts:/{exp}"
    finally:
        _stop(server, signal.SIGTERM)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path)
    client = MlflowClient()
    artifacts = (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    assert client.get_experiment_by_name("old").artifact_location == f"{artifacts}/{exp}"
    assert client.get_run(run.info.run_id).info.artifact_uri == f"{artifacts}/{exp}/{run.info.run_id}/artifacts"
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/note.txt") == "kept as it was"
    assert tracking.repair_artifact_roots(database) == 0  # nothing left to repair


def _healthy(base: str) -> bool:
    try:
        return _http(f"{base}/health")[0] == 200
    except OSError:
        return False


def test_reading_commands_outside_a_project_refuse_and_create_nothing(tmp_path):
    from flows import tracking

    # tmp_path itself may lie inside a project (CI points TMPDIR into the checkout): then a directory in /tmp
    base = next((d for d in (tmp_path, Path("/tmp"), Path("/var/tmp")) if tracking.project_root(d) is None), None)
    assert base is not None, "no directory outside a project to try it in"
    outside = Path(tempfile.mkdtemp(prefix="lmp-outside-", dir=base))
    try:
        result = subprocess.run(
            [LMP, "models"], cwd=outside, env=_env(tmp_path / "p"), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{outside.resolve()} is not inside a project" in result.stderr
        assert "cd into the project, or set MLFLOW_TRACKING_URI" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert list(outside.iterdir()) == []  # no ./mlruns/mlflow.db
    finally:
        shutil.rmtree(outside)


def test_a_reading_command_in_a_project_subdirectory_uses_the_projects_store(tmp_path, monkeypatch):
    from flows import tracking

    project = _project(tmp_path / "p")
    (project / "notes").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project / "notes")
    assert tracking.configure_project() == tracking.default_tracking_uri(project)
    assert not (project / "notes" / "mlruns").exists()
