"""Shared servers for real: `lmp up --backend postgresql` (PostgreSQL behind Prefect and MLflow, MLflow's basic auth
and Prefect's auth string on) in one network namespace, reached over veth links by `lmp` commands in two others
that stand for two hosts (tests/netns.py): runs from both at once, a promotion made on one seen on the other, a
sweep trial on a Dask worker of the other host, `lmp schedule` on a host, and wrong credentials.

Everything the README's "Running on shared servers" section tells a team, run as written: the servers' project
is the shared work directory, each host sources ``.lmp/servers.env`` (the exports `lmp up` writes) and has its own
cache directory (training slots are per machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.ops import postgres
from tests import netns
from tests.flows.helpers import LMP, ROOT

pytestmark = pytest.mark.slow  # real servers in namespaces: `pytest -m ""` (CI) runs it, plain `pytest` does not

SMOKE_STEPS, SMOKE_LOG_EVERY = 40, 5
PYTHON = sys.executable


@pytest.fixture(scope="module")
def hosts():
    missing = netns.unavailable()
    if missing is None:
        try:
            postgres.binaries()
        except postgres.PostgresError as e:
            missing = str(e)
    netns.require(missing)
    made = netns.Hosts()
    try:
        yield made
    finally:
        made.close()


def _exports(path: Path) -> dict[str, str]:
    """The ``export K=V`` lines of a servers.env (values are plain tokens: no quoting to undo)."""
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if line)
    return dict(pairs)


class Shared:
    """The servers (namespace ``servers``) and the two hosts' environments."""

    def __init__(self, hosts: netns.Hosts, project: Path):
        self.hosts, self.project = hosts, project
        self.exports: dict[str, str] = {}

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """What a shell on ``host`` has after `. .lmp/servers.env`: the servers' URLs and credentials."""
        local = ("PREFECT_API", "MLFLOW_TRACKING", "MLFLOW_REGISTRY")  # this process's own servers and stores
        base = {k: v for k, v in os.environ.items() if not k.startswith(local)}
        cache = self.project / f"cache-{host}"
        return base | self.exports | {"TMPDIR": str(self.project / "tmp"), "XDG_CACHE_HOME": str(cache)} | extra

    def lmp(self, host: str, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        return self.hosts.run(host, [LMP, *args], cwd=self.project, env=self.env(host, **extra), timeout=timeout)

    def python(self, host: str, code: str, timeout: float = 120) -> object:
        """Run ``code`` on ``host`` with the servers' environment; what it prints as its last line, as JSON."""
        done = self.hosts.run(host, [PYTHON, "-c", code], cwd=self.project, env=self.env(host), timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shared(hosts, tmp_path_factory):
    """`lmp up --backend postgresql --host S` in the servers' namespace, in a project every host shares."""
    project = tmp_path_factory.mktemp("shared") / "project"
    project.mkdir()
    (project / "tmp").mkdir()
    config = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    smoke = config["pipelines"]["smoke"]
    assert (smoke["train"]["max_steps"], smoke["train"]["log_interval"]) == (SMOKE_STEPS, SMOKE_LOG_EVERY)
    smoke["sweep"] = {
        "method": "grid",
        "parameters": {"train.learning_rate": [0.005]},
        "scheduler_address": f"tcp://{hosts.addr['a']}:8786",
    }
    smoke["schedule"] = {"interval": 15}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(config))
    served = Shared(hosts, project)
    server_env = served.env("servers")
    up = hosts.run(
        "servers", [LMP, "up", "--backend", "postgresql", "--host", hosts.addr["servers"]], cwd=project, env=server_env
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        served.exports = _exports(project / ".lmp" / "servers.env")
        yield served
    finally:
        hosts.run("servers", [LMP, "down"], cwd=project, env=server_env)


def test_up_keeps_the_generated_passwords_out_of_its_output_and_logs(shared):
    env_file, secrets = shared.project / ".lmp" / "servers.env", shared.project / ".lmp" / "secrets.json"
    assert env_file.stat().st_mode & 0o777 == 0o600 and secrets.stat().st_mode & 0o777 == 0o600
    found = json.loads(secrets.read_text())
    assert shared.exports["PREFECT_API_URL"] == f"http://{shared.hosts.addr['servers']}:4200/api"
    assert shared.exports["MLFLOW_TRACKING_URI"] == f"http://{shared.hosts.addr['servers']}:5000"
    assert shared.exports["MLFLOW_TRACKING_PASSWORD"] == found["mlflow_password"]
    passwords = [found["postgres_password"], found["mlflow_password"], found["prefect_auth_string"].split(":", 1)[1]]
    logs = [p for p in (shared.project / ".lmp" / "logs").iterdir() if p.is_file()]
    logs.append(shared.project / ".lmp" / "servers.json")
    for path in logs:
        text = path.read_text(errors="replace")
        assert not any(secret in text for secret in passwords), path
    # The database listens on the servers' loopback only: a host cannot even connect to it.
    reach = shared.python("a", "import socket, json\ns = socket.socket(); s.settimeout(3)\n"
                          f"print(json.dumps(s.connect_ex(({shared.hosts.addr['servers']!r}, 54320))))")  # fmt: skip
    assert reach != 0


@pytest.mark.parametrize(
    ("wrong", "server"),
    [({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, "MLflow server at http://{}:5000 refused the account 'admin'"),
     ({"PREFECT_API_AUTH_STRING": "admin:not-the-password"}, "Prefect server at http://{}:4200/api refused")],
)  # fmt: skip
def test_wrong_credentials_are_one_error_naming_the_server(shared, wrong, server):
    done = shared.lmp("b", "run", "smoke", timeout=180, **wrong)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the "), done.stderr
    assert server.format(shared.hosts.addr["servers"]) in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr


HISTORY = """
import json
from mlflow import MlflowClient
client = MlflowClient()
runs = {{}}
for run_id in {run_ids!r}:
    run = client.get_run(run_id)
    runs[run_id] = {{"status": run.info.status, "metrics": {{
        key: sorted(m.step for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics if not key.startswith("system/")}}}}
print(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def two_runs(shared):
    """`lmp run smoke` on both hosts at once (different learning rates: two registered versions)."""
    started = {}
    for host, rate in (("a", "0.003"), ("b", "0.004")):
        out = open(shared.project / f"run-{host}.log", "w")
        started[host] = shared.hosts.popen(
            host, [LMP, "run", "smoke", "-o", f"train.learning_rate={rate}"], cwd=shared.project,
            env=shared.env(host), stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    for process in started.values():
        process.wait(timeout=400)
    return {
        host: (process.returncode, (shared.project / f"run-{host}.log").read_text())
        for host, process in started.items()
    }


def _run_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("view the run: "))
    return line.rsplit("/", 1)[1]


def test_runs_from_both_hosts_at_once_lose_no_metric_row(shared, two_runs):
    for host, (code, output) in two_runs.items():
        assert code == 0, f"{host}: {output[-3000:]}"
        assert "database is locked" not in output and "deadlock" not in output.lower(), output
    run_ids = [_run_id(output) for _, output in two_runs.values()]
    runs = shared.python("b", HISTORY.format(run_ids=run_ids))
    logged = sorted({*range(SMOKE_LOG_EVERY, SMOKE_STEPS + 1, SMOKE_LOG_EVERY), SMOKE_STEPS})
    for run_id in run_ids:
        assert runs[run_id]["status"] == "FINISHED"
        assert runs[run_id]["metrics"]["train_loss"] == logged, run_id
    assert runs[run_ids[0]]["metrics"] == runs[run_ids[1]]["metrics"]  # every key, every step, on both
    server_logs = "".join(
        p.read_text(errors="replace") for p in (shared.project / ".lmp" / "logs").glob("*-server.log")
    )
    assert "database is locked" not in server_logs and "deadlock detected" not in server_logs


CHAMPION = """
import json
from mlflow import MlflowClient
print(json.dumps(int(MlflowClient().get_model_version_by_alias("smoke", "champion").version)))
"""


def test_a_promotion_on_one_host_is_the_champion_on_the_other(shared, two_runs):
    assert all(code == 0 for code, _ in two_runs.values())
    champion = shared.python("b", CHAMPION)
    other = 1 if champion == 2 else 2
    done = shared.lmp("a", "promote", "smoke", "--version", str(other), "--force", "--reason", "two-host test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert shared.python("b", CHAMPION) == other


def test_a_sweep_trial_runs_on_a_dask_worker_of_the_other_host(shared, hosts):
    """The scheduler on host a, the only worker on host b: `lmp sweep` on a trains its trial on b."""
    dask = str(Path(PYTHON).with_name("dask"))
    logs = {name: open(shared.project / f"{name}.log", "w") for name in ("scheduler", "worker")}
    scheduler = hosts.popen(
        "a", [dask, "scheduler", "--host", hosts.addr["a"], "--port", "8786", "--dashboard-address",
              f"{hosts.addr['a']}:0"],
        cwd=shared.project, env=shared.env("a"), stdout=logs["scheduler"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = hosts.popen(
        "b", [dask, "worker", f"tcp://{hosts.addr['a']}:8786", "--host", hosts.addr["b"], "--nworkers", "1",
              "--nthreads", "1", "--no-dashboard"],
        cwd=shared.project, env=shared.env("b"), stdout=logs["worker"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        done = shared.lmp("a", "sweep", "smoke", timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        trials = shared.python("a", TRIAL_WORKERS)
        assert trials and all(worker.startswith(f"tcp://{hosts.addr['b']}:") for worker in trials), trials
    finally:
        for process in (scheduler, worker):
            process.terminate()
        for process in (scheduler, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


TRIAL_WORKERS = """
import json
from mlflow import MlflowClient
client = MlflowClient()
experiment = client.get_experiment_by_name("smoke")
runs = client.search_runs([experiment.experiment_id], "tags.`lmp.sweep.trial` != ''")
print(json.dumps([run.data.tags.get("lmp.sweep.worker", "") for run in runs]))
"""

SCHEDULED = """
import json, time
from prefect.client.orchestration import get_client
deadline = time.monotonic() + {seconds}
with get_client(sync_client=True) as client:
    while True:
        runs = [r for r in client.read_flow_runs() if r.deployment_id is not None and r.state and r.state.is_final()]
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)  # bounded poll of the server for the scheduled run's outcome
print(json.dumps([r.state.type.value for r in runs]))
"""


def test_lmp_schedule_on_a_host_runs_the_schedule_against_the_shared_servers(shared, hosts):
    with open(shared.project / "schedule.log", "w") as log:
        serving = hosts.popen("b", [LMP, "schedule", "smoke"], cwd=shared.project,
                              env=shared.env("b", PREFECT_RUNNER_POLL_FREQUENCY="1"), stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        states = shared.python("a", SCHEDULED.format(seconds=240), timeout=300)
        assert states and states[0] == "COMPLETED", (shared.project / "schedule.log").read_text()[-3000:]
    finally:
        serving.terminate()
        try:
            serving.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serving.kill()
