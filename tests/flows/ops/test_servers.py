"""Real servers and real processes: `lmp up`/`lmp down`, a scheduled run served by `lmp schedule`, what a web page
or a foreign request can (not) do to them, and two `lmp run`s at once sharing one store and taking turns to train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.flows.helpers import free_port, http

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[3]
LMP = str(Path(sys.executable).with_name("lmp"))


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


@dataclass
class Served:
    """One `lmp up` with `lmp schedule smoke` serving against it (shared by the tests of this module)."""

    project: Path
    prefect_port: int
    mlflow_port: int
    deployment_id: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"


def _csrf(api: str) -> dict[str, str]:
    """The headers a same-machine client needs for a change (none while CSRF protection is off)."""
    status, _, body = http(f"{api}/csrf-token?client=lmp-test")
    return {"Prefect-Csrf-Token": json.loads(body)["token"], "Prefect-Csrf-Client": "lmp-test"} if status == 200 else {}


def _completed_runs(api: str) -> list[dict]:
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    status, _, text = http(f"{api}/flow_runs/filter", "POST", body, **_csrf(api))
    assert status == 200, text
    return [run for run in json.loads(text) if run.get("deployment_id")]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`lmp up` in a fresh project, `lmp schedule smoke` (every 20 s) serving against it; both stopped after, and
    `lmp down` must then leave no process and no state file behind."""
    project = _project(tmp_path_factory.mktemp("up") / "p", schedule={"interval": 20})
    (project.parent / "outside.txt").write_text("SECRET outside the project\n" * 500)
    prefect_port, mlflow_port = free_port(), free_port()
    started = _lmp(project, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
    assert started.returncode == 0, started.stderr
    state = json.loads((project / ".lmp" / "servers.json").read_text())
    pids = [s["pid"] for s in state["servers"].values()]
    scheduler = None
    try:
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in started.stdout
        with open(project / "schedule.log", "w") as log:
            scheduler = subprocess.Popen(
                [LMP, "schedule", "smoke"], cwd=project, env=_env(project, PREFECT_RUNNER_POLL_FREQUENCY="1"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        api, deadline, found = f"http://127.0.0.1:{prefect_port}/api", time.monotonic() + 120, []
        while not found and time.monotonic() < deadline and scheduler.poll() is None:
            found = json.loads(http(f"{api}/deployments/filter", "POST", {}, **_csrf(api))[2])
            time.sleep(0.5)  # bounded poll of the real server for the deployment `lmp schedule` registers
        assert found, (project / "schedule.log").read_text()[-3000:]
        yield Served(project, prefect_port, mlflow_port, found[0]["id"])
    finally:
        try:
            if scheduler is not None:
                _stop(scheduler)
        finally:
            stopped = _lmp(project, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert not [pid for pid in pids if _alive(pid)]
    assert not (project / ".lmp" / "servers.json").exists()


def test_up_refuses_a_second_copy(served):
    ports = ["--prefect-port", str(served.prefect_port), "--mlflow-port", str(served.mlflow_port)]
    again = _lmp(served.project, "up", *ports)
    assert again.returncode == 2 and "still running" in again.stderr and "lmp down" in again.stderr


def test_a_web_page_cannot_preflight_the_prefect_api(served):
    url = f"{served.api}/deployments/{served.deployment_id}/create_flow_run"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    _, headers, _ = http(url, "OPTIONS", Origin="http://evil.example", **preflight)
    assert headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    own = f"http://localhost:{served.prefect_port}"  # the UI opened as localhost calls the API at 127.0.0.1
    status, headers, _ = http(url, "OPTIONS", Origin=own, **preflight)
    assert status == 200 and headers["access-control-allow-origin"] == own


def test_a_cross_origin_post_and_a_foreign_host_are_refused(served):
    url = f"{served.api}/deployments/{served.deployment_id}/create_flow_run"
    evil = {"spec": {"name": "smoke"}}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}):  # a "simple" POST needs no preflight
        status, _, body = http(url, "POST", {"parameters": evil}, **headers, **_csrf(served.api))
        assert status in (400, 403), body
    status, _, body = http(f"{served.api}/health", Host=f"evil.example:{served.prefect_port}")  # DNS rebinding
    assert status in (400, 403), body
    assert http(f"{served.api}/csrf-token?client=x")[0] == 200  # CSRF protection is on (422 when it is off)
    status, headers, body = http(url, "POST", {"parameters": {"pipeline": "smoke"}})  # no token: refused
    assert status == 403 and "CSRF" in body
    assert http(f"http://127.0.0.1:{served.prefect_port}/")[0] == 200  # the UI is served

    mlflow = f"http://127.0.0.1:{served.mlflow_port}/api/2.0/mlflow/experiments/search"
    assert http(mlflow, "POST", {"max_results": 1})[0] == 200
    assert http(mlflow, "POST", {"max_results": 1}, Host=f"evil.example:{served.mlflow_port}")[0] == 403
    assert http(mlflow, "POST", {"max_results": 1}, Origin="http://evil.example")[0] in (400, 403)


def _final_state(api: str, flow_run_id: str, deadline_s: float = 240) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        run = json.loads(http(f"{api}/flow_runs/{flow_run_id}")[2])
        if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(0.5)  # bounded poll of the real server for the runner's outcome
    raise AssertionError(f"flow run {flow_run_id} did not finish within {deadline_s} s")


def test_the_scheduled_run_completes_and_a_spec_or_a_foreign_override_never_runs(served):
    api, outside = served.api, str(served.project.parent / "outside.txt")
    url = f"{api}/deployments/{served.deployment_id}/create_flow_run"
    spec = json.loads(http(f"{api}/deployments/{served.deployment_id}")[2])["parameters"].get("spec") or {}
    spec = {**spec, "data": {"source": "files", "paths": [outside], "allow_outside": True}}
    status, _, body = http(url, "POST", {"parameters": {"spec": spec}}, **_csrf(api))
    assert status in (409, 422), body  # Prefect itself checks them against the deployment's closed schema
    status, _, body = http(url, "POST", {"parameters": {"pipeline": "smoke", "overrides": {"data.paths": [outside]}}},
                            **_csrf(api))  # fmt: skip
    assert status in (409, 422), body
    forced = http(url, "POST", {"parameters": {"spec": spec}, "enforce_parameter_schema": False,
                                 "idempotency_key": "forced-spec"}, **_csrf(api))  # fmt: skip
    foreign = http(url, "POST", {"parameters": {"pipeline": "smoke", "overrides": {"data.allow_outside": True}},
                                  "idempotency_key": "foreign-override"}, **_csrf(api))  # fmt: skip
    assert forced[0] in (200, 201) and foreign[0] in (200, 201), (forced, foreign)

    refused = [_final_state(api, json.loads(r[2])["id"]) for r in (forced, foreign)]
    assert all(r["state"]["type"] in ("FAILED", "CRASHED") for r in refused), refused
    assert refused[1]["state"]["message"].startswith(
        "refused: override 'data.allow_outside' is not allowed for scheduled runs; allowed: train.max_steps"
    )

    deadline, runs = time.monotonic() + 240, []
    while not runs and time.monotonic() < deadline:
        runs = _completed_runs(api)
        time.sleep(0.5)  # bounded poll of the real server for the scheduled run's outcome
    assert runs, (served.project / "schedule.log").read_text()[-3000:]
    assert runs[0]["name"].startswith("smoke-")  # named after the pipeline and its data digest
    ingested = [p for p in (served.project / ".lmp").rglob("*.txt") if "SECRET outside" in p.read_text()]
    assert not ingested  # the outside file was never read

    listing = _lmp(served.project, "schedule", "--list")
    assert listing.returncode == 0 and "smoke" in listing.stdout

    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{served.mlflow_port}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow_runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    finished = [r for r in mlflow_runs if r.info.status == "FINISHED"]
    assert finished and finished[0].data.tags["prefect.flow_run_url"].startswith(
        f"http://127.0.0.1:{served.prefect_port}"
    )
    assert client.search_model_versions("name = 'smoke'")
    refused_ids = {r["id"] for r in refused}
    assert not [r for r in mlflow_runs if r.data.tags.get("prefect.flow_run_id") in refused_ids]


def test_lmp_ui_refuses_a_foreign_host_and_origin(tmp_path):
    project = _project(tmp_path / "p")
    port = free_port()
    with open(tmp_path / "ui.log", "w") as log:
        ui = subprocess.Popen([LMP, "ui", "--port", str(port)], cwd=project, env=_env(project), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        base, deadline, status = f"http://127.0.0.1:{port}", time.monotonic() + 90, None
        while status != 200 and time.monotonic() < deadline and ui.poll() is None:
            try:
                status = http(f"{base}/health")[0]
            except OSError:
                time.sleep(0.2)  # bounded poll until the server answers
        assert status == 200, (tmp_path / "ui.log").read_text()[-3000:]
        search = f"{base}/api/2.0/mlflow/experiments/search"
        assert http(search, "POST", {"max_results": 1})[0] == 200
        assert http(search, "POST", {"max_results": 1}, Host=f"evil.example:{port}")[0] == 403
        assert http(search, "POST", {"max_results": 1}, Origin="http://evil.example")[0] in (400, 403)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def test_down_after_the_servers_were_killed_is_clean(tmp_path):
    project = _project(tmp_path / "p")
    ports = ["--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
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
