"""`lmp up` / `lmp down`: a local Prefect server and MLflow tracking server, started and stopped together.

Both are the real engines (Prefect's server app as `prefect server start` builds it, `mlflow server`), bound to
127.0.0.1 — they have no authentication, so they must not be reachable from other hosts, nor drivable by a web
page the user opens: the Prefect server answers CORS for its own origin only, wants a CSRF token for every
change, and sits behind ``flows.ops.guard`` (a foreign ``Host`` or ``Origin`` is refused); MLflow's server refuses
a foreign ``Host`` and cross-origin changes by itself. The Prefect server keeps its database
under ``.lmp/prefect/``; the MLflow server uses the project's ``mlruns/mlflow.db`` and gives new experiments
the file artifact root ``mlruns/artifacts`` — the embedded store's own — so a pipeline tracked through the
server runs on the embedded store after `lmp down`, and the other way round. What was started (process ids,
ports, URLs) is recorded in ``.lmp/servers.json``; `lmp down` stops exactly those process groups.
"""

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

from flows.ops.guard import allowed_hosts, allowed_origins
from flows.resume import _alive
from lm.atomic import atomic_write_bytes

STATE = "servers.json"
HEALTH_TIMEOUT_S = 90.0
APP_DIR = Path(__file__).resolve().parents[2]  # where `flows` is imported from (not a `flows/` in the project)


class ServersError(RuntimeError):
    """The servers cannot be started or stopped as asked; the message says why and what to do."""


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def read_state(workdir: Path) -> dict | None:
    try:
        return json.loads((Path(workdir) / STATE).read_text())
    except (OSError, ValueError):
        return None


def running(workdir: Path) -> dict | None:
    """The recorded servers if any of their processes is still alive."""
    state = read_state(workdir)
    if state and any(_alive(s["pid"]) for s in state["servers"].values()):
        return state
    return None


def use(workdir: Path) -> dict[str, str]:
    """Point this process (and the runs it starts) at the Prefect API and MLflow server to use: PREFECT_API_URL,
    else what `lmp up` recorded. Call it before importing Prefect, which reads its settings once."""
    if os.environ.get("PREFECT_API_URL"):
        return {k: os.environ[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if k in os.environ}
    state = running(workdir)
    if state is None:
        raise ServersError(
            "schedules need a Prefect server that outlives this command: run `lmp up` first, or set "
            "PREFECT_API_URL (and MLFLOW_TRACKING_URI) to shared servers"
        )
    for key, value in state["env"].items():
        os.environ.setdefault(key, value)
    return dict(state["env"])


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServersError(f"{url} exited with {process.returncode} before answering; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise ServersError(f"{url} did not answer within {HEALTH_TIMEOUT_S:.0f} s; see {log}")


def store_artifact_args(database: Path) -> list[str]:
    """The `mlflow server` options that make a server on the embedded store ``database`` agree with it on where
    artifacts are: experiments it creates get a file root under ``mlruns/artifacts`` (a location any client of
    the store reads, server or not — the default, ``mlflow-artifacts:/N``, resolves only through an HTTP server),
    and ``mlflow-artifacts:/`` URIs it still meets (stores from an older `lmp up`) resolve to that directory."""
    directory = (Path(database).parent / "artifacts").resolve()
    return ["--default-artifact-root", directory.as_uri(), "--artifacts-destination", str(directory)]


def mlflow_command(root: Path, port: int) -> list[str]:
    """`mlflow server` on the project's embedded store, one worker, loopback Host and Origin only."""
    database = Path(root) / "mlruns" / "mlflow.db"
    return [
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{database}",
        *store_artifact_args(database), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", ",".join(allowed_hosts(port)), "--cors-allowed-origins", ",".join(allowed_origins(port)),
    ]  # fmt: skip


def prefect_command(port: int) -> list[str]:
    """Prefect's server app (API, UI, services) behind flows.ops.guard, as `prefect server start` serves it."""
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(APP_DIR), "--factory", "flows.ops.guard:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on", "--no-proxy-headers",
        "--timeout-keep-alive", "5", "--ws-ping-interval", "20", "--ws-ping-timeout", "20", "--log-level", "warning",
    ]  # fmt: skip


def prefect_env(port: int, workdir: Path) -> dict[str, str]:
    """Prefect server settings: its own database, no analytics, CORS for its own origin only, CSRF on."""
    return {
        "PREFECT_HOME": str((workdir / "prefect").resolve()),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),  # flows.ops.guard reads it: the Host and Origin it accepts
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(allowed_origins(port)),
        "PREFECT_SERVER_CORS_ALLOWED_METHODS": "GET,POST,PUT,PATCH,DELETE",
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",  # the Prefect client and UI fetch their token themselves
    }


def up(root: Path, workdir: Path, prefect_port: int, mlflow_port: int) -> dict:
    """Start both servers, wait until both answer, record them; returns the recorded state."""
    root, workdir = Path(root).resolve(), Path(workdir)
    if (state := running(workdir)) is not None:
        urls = ", ".join(s["url"] for s in state["servers"].values())
        raise ServersError(f"servers from an earlier `lmp up` are still running ({urls}); run `lmp down` first")
    for name, port in (("Prefect", prefect_port), ("MLflow", mlflow_port)):
        if not port_free(port):
            raise ServersError(
                f"port {port} for the {name} server is in use on 127.0.0.1; pick another with --{name.lower()}-port"
            )
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    base_env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    base_env.pop("PREFECT_API_URL", None)
    specs = {
        "prefect": (
            prefect_command(prefect_port),
            base_env | prefect_env(prefect_port, workdir),
            f"http://127.0.0.1:{prefect_port}/api/health",
            f"http://127.0.0.1:{prefect_port}",
        ),
        "mlflow": (
            mlflow_command(root, mlflow_port),
            base_env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
            f"http://127.0.0.1:{mlflow_port}/health",
            f"http://127.0.0.1:{mlflow_port}",
        ),
    }  # fmt: skip
    started: dict[str, dict] = {}
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, (command, env, _, url) in specs.items():
            log = logs / f"{name}-server.log"
            with open(log, "ab") as out:
                processes[name] = subprocess.Popen(
                    command, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
                )
            started[name] = {"pid": processes[name].pid, "url": url, "log": str(log)}
        # The address to open: MLflow 3's UI starts in its GenAI mode (traces) unless the URL asks for runs.
        started["mlflow"]["ui"] = f"{started['mlflow']['url']}/#/?workflowType=machine_learning"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        for name, (_, _, health, _) in specs.items():
            _wait_healthy(health, processes[name], logs / f"{name}-server.log", deadline)
    except BaseException:
        for process in processes.values():
            _stop_group(process.pid)
        raise
    state = {
        "servers": started,
        "env": {
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        },
    }
    atomic_write_bytes(workdir / STATE, json.dumps(state, indent=2).encode())
    return state


def _stop_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group, wait for it, SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(workdir: Path) -> list[str]:
    """Stop what `lmp up` recorded (whatever is still alive) and forget it; returns what was stopped."""
    state = read_state(workdir)
    if state is None:
        raise ServersError(f"no servers recorded in {Path(workdir) / STATE}; nothing to stop")
    stopped = []
    for name, server in state["servers"].items():
        if _alive(server["pid"]):
            _stop_group(server["pid"])
            stopped.append(f"{name} ({server['url']})")
    (Path(workdir) / STATE).unlink(missing_ok=True)
    return stopped
