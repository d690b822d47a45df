"""The README's multi-host recipe, run as written on two simulated hosts (network namespaces `a` and `b`,
tests/netns.py) sharing one project directory: `lmp run smoke` with `train.distributed.nnodes: 2` on `a`, the
README's node command on `b`; the losses match a single-process run of the same config."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import netns

pytestmark = pytest.mark.slow  # real processes and namespaces: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))
PORT = 29500  # in namespace `a`, which nothing else uses
STEPS = 20


@pytest.fixture
def hosts():
    netns.require(netns.unavailable())
    made = netns.Hosts()
    try:
        yield made
    finally:
        made.close()


def _env(tmp: Path, host: str) -> dict:
    """Each host its own temporary and cache directories (distinct machines: distinct caches and locks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    (tmp / f"tmp-{host}").mkdir(exist_ok=True)
    return env | {"TMPDIR": str(tmp / f"tmp-{host}"), "XDG_CACHE_HOME": str(tmp / f"cache-{host}")}


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else f"({path.name}: nothing)"


def _readme_node_command() -> list[str]:
    """The command the README's "Several hosts" paragraph tells a user to run on each other host."""
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("**Several hosts.**") :].split("\n\n", 1)[0]
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", paragraph)]
    [command] = [span for span in spans if span.startswith("python -m torch.distributed.run")]
    return command.split()


def test_two_hosts_train_like_one_process(hosts, tmp_path):
    """`lmp run smoke` with nnodes 2 on host `a`, the command it logs for node 1 run on host `b` (after checking it
    is the README's): both exit 0, no process is left on either host, and one MLflow run has the single-process
    run's train_loss at every logged step (1e-4 nats) and its val_loss (1e-3), as tests/flows/test_distributed.py
    holds two processes on one host to."""
    from mlflow.tracking import MlflowClient

    from flows import tracking

    project = tmp_path / "project"  # the same path on both hosts: the shared file system
    project.mkdir()
    config = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    config["pipelines"]["smoke"]["train"]["max_steps"] = STEPS
    (project / "pipelines.yaml").write_text(yaml.safe_dump(config))

    single = hosts.run("a", [LMP, "run", "smoke"], cwd=project, env=_env(tmp_path, "a"), timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    master = hosts.addr["a"]
    overrides = {"nnodes": 2, "nproc_per_node": 1, "master_addr": master, "master_port": PORT, "backend": "gloo"}
    args = [LMP, "run", "smoke"] + [a for k, v in overrides.items() for a in ("-o", f"train.distributed.{k}={v}")]
    first = second = None
    try:
        with open(tmp_path / "a.log", "w") as log:
            first = hosts.popen("a", args, cwd=project, env=_env(tmp_path, "a"), stdout=log, stderr=subprocess.STDOUT)
        deadline, said = time.monotonic() + 240, None
        while said is None and time.monotonic() < deadline and first.poll() is None:
            said = re.search(r"train: node 1 of 2: on its host, in (.+?), run: (.+)$", _read(tmp_path / "a.log"), re.M)
            time.sleep(0.2)  # polling for the line the first host logs for the second, bounded by the deadline
        assert said is not None, _tail(tmp_path / "a.log")
        assert shlex.split(said[1]) == [str(project)]
        node = shlex.split(said[2])
        job = project / node[-1]  # relative to the project directory, as every path in it
        run_id = job.parent.name
        assert job.is_file() and job.parent.parent == project / ".lmp" / "runs", node
        values = {"N": "2", "P": "1", "K": "1", "MASTER": master, "PORT": str(PORT)}
        readme = [values.get(word, word.replace("/RUN/", f"/{run_id}/")) for word in _readme_node_command()]
        assert node[1:] == readme[1:] and Path(node[0]).name.startswith("python"), (node, readme)
        with open(tmp_path / "b.log", "w") as log:
            second = hosts.popen("b", node, cwd=project, env=_env(tmp_path, "b"), stdout=log, stderr=subprocess.STDOUT)
        try:
            code_b = second.wait(timeout=300)
            code_a = first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish\n{_tail(tmp_path / 'a.log')}\n{_tail(tmp_path / 'b.log')}")
        torchrun_log = project / ".lmp" / "runs" / run_id / "torchrun.log"
        output = f"{_tail(tmp_path / 'a.log')}\n{_tail(torchrun_log)}\n{_tail(tmp_path / 'b.log')}"
        assert code_a == 0 and code_b == 0, output
        deadline, left = time.monotonic() + 30, hosts.pids("a") + hosts.pids("b")
        while left and time.monotonic() < deadline:
            time.sleep(0.2)  # polling for the hosts' last processes to exit, bounded by the deadline
            left = hosts.pids("a") + hosts.pids("b")
        assert left == [], f"processes left on the hosts: {left}"
    finally:
        _stop(second)
        _stop(first)

    tracking.configure_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"] and runs[1].info.run_id == run_id
    history = lambda r: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train_loss")}  # noqa: E731
    one, two = history(runs[0]), history(runs[1])
    assert sorted(two) == sorted(one) == list(range(5, STEPS + 1, 5))  # rank 0 alone logs: no duplicate steps
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert runs[1].data.metrics["val_loss"] == pytest.approx(runs[0].data.metrics["val_loss"], abs=1e-3)
