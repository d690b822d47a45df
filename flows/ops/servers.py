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
import secrets as secrets_module
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

from flows.ops import postgres
from flows.ops.guard import allowed_hosts, allowed_origins
from flows.resume import _alive
from lm.atomic import atomic_write_bytes

STATE = "servers.json"
SECRETS = "secrets.json"
CLIENT_ENV = "servers.env"
"""What a client's shell sources to use the servers: their URLs and (PostgreSQL backend) credentials."""
BACKENDS = ("sqlite", "postgresql")
POSTGRES_PORT = 54320
HEALTH_TIMEOUT_S = 90.0
APP_DIR = Path(__file__).resolve().parents[2]  # where `flows` is imported from (not a `flows/` in the project)


class ServersError(RuntimeError):
    """The servers cannot be started or stopped as asked; the message says why and what to do."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
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
    env = state["env"] | client_credentials(workdir, state)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


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


def mlflow_command(root: Path, port: int, host: str = "127.0.0.1", database_uri: str | None = None) -> list[str]:
    """`mlflow server` on the project's embedded store (or ``database_uri``), one worker, artifacts under
    ``mlruns/artifacts``, only its own Host and Origin names."""
    database = Path(root) / "mlruns" / "mlflow.db"
    return [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", database_uri or f"sqlite:///{database}",
        *store_artifact_args(database), "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", "1",
        "--allowed-hosts", ",".join(allowed_hosts(port, host)),
        "--cors-allowed-origins", ",".join(allowed_origins(port, host)),
    ]  # fmt: skip


def prefect_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """Prefect's server app (API, UI, services) behind flows.ops.guard, as `prefect server start` serves it."""
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(APP_DIR), "--factory", "flows.ops.guard:create_app",
        "--host", host, "--port", str(port), "--lifespan", "on", "--no-proxy-headers",
        "--timeout-keep-alive", "5", "--ws-ping-interval", "20", "--ws-ping-timeout", "20", "--log-level", "warning",
    ]  # fmt: skip


def prefect_env(port: int, workdir: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """Prefect server settings: its own database, no analytics, CORS for its own origin only, CSRF on."""
    return {
        "PREFECT_HOME": str((workdir / "prefect").resolve()),
        "PREFECT_SERVER_API_HOST": host,  # flows.ops.guard reads both: the Host and Origin it accepts
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(allowed_origins(port, host)),
        "PREFECT_SERVER_CORS_ALLOWED_METHODS": "GET,POST,PUT,PATCH,DELETE",
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",  # the Prefect client and UI fetch their token themselves
    }


def secrets(workdir: Path) -> dict[str, str]:
    """The generated secrets of a PostgreSQL-backed `lmp up` (``.lmp/secrets.json``, readable by its owner only),
    made on first use and kept: the cluster and MLflow's user store remember the passwords."""
    path = Path(workdir) / SECRETS
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        found = {}
    except (OSError, ValueError) as e:
        raise ServersError(f"{path} cannot be read ({e}); restore it, or move .lmp/postgres and it away") from None
    if "postgres_password" not in found and (Path(workdir) / "postgres" / "data").exists():
        raise ServersError(f"{path} is missing but .lmp/postgres holds a cluster made with it; restore the file, "
                           "or move .lmp/postgres away to start a new cluster")  # fmt: skip
    made = {
        "postgres_password": secrets_module.token_urlsafe(24),
        "prefect_auth_string": f"admin:{secrets_module.token_urlsafe(24)}",
        "mlflow_username": "admin",
        "mlflow_password": secrets_module.token_urlsafe(24),
        "mlflow_flask_secret_key": secrets_module.token_urlsafe(32),  # signs the MLflow UI's CSRF tokens
    }
    if made.keys() - found.keys():
        found = made | found
        atomic_write_bytes(path, json.dumps(found, indent=2).encode())
    return found


def client_credentials(workdir: Path, state: dict) -> dict[str, str]:
    """What a client of these servers needs beyond their URLs: none, or the auth string and MLflow account."""
    if state.get("backend") != "postgresql":
        return {}
    found = secrets(workdir)
    return {
        "PREFECT_API_AUTH_STRING": found["prefect_auth_string"],
        "MLFLOW_TRACKING_USERNAME": found["mlflow_username"],
        "MLFLOW_TRACKING_PASSWORD": found["mlflow_password"],
    }


def _auth_config(workdir: Path, postgres_port: int, found: dict[str, str]) -> Path:
    """MLflow's basic-auth app settings: users in the ``mlflow_auth`` database, an admin account, and READ for
    accounts an admin creates without saying more."""
    path = Path(workdir) / "mlflow-auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres.url(postgres_port, 'mlflow_auth')}\n"
        f"admin_username = {found['mlflow_username']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # Without a cache every request re-derives the password's PBKDF2 hash (≈ 0.1 s of CPU): a run's hundreds of
        # requests would wait on it. A password change reaches this one-worker server at once (MLflow drops the
        # entry); only a change made in the database by hand waits out the minute.
        "auth_cache_ttl_seconds = 60\n"
    )
    atomic_write_bytes(path, text.encode())
    return path


def up(
    root: Path,
    workdir: Path,
    prefect_port: int,
    mlflow_port: int,
    *,
    backend: str = "sqlite",
    host: str = "127.0.0.1",
    postgres_port: int = POSTGRES_PORT,
) -> dict:
    """Start the servers, wait until each answers, record them; returns the recorded state.

    ``backend="sqlite"``: Prefect's own SQLite database and the project's embedded MLflow store, no authentication,
    loopback only. ``"postgresql"``: a PostgreSQL cluster under ``.lmp/postgres`` (127.0.0.1 only) as the database
    of both, MLflow's basic-auth app and Prefect's auth string on, and the two servers may listen on ``host``."""
    root, workdir = Path(root).resolve(), Path(workdir)
    if backend not in BACKENDS:
        raise ServersError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if host in ("0.0.0.0", "::", "[::]", ""):
        raise ServersError(
            f"--host {host!r} names no address: give the one other hosts reach this machine at (e.g. --host "
            "10.0.0.5); the servers answer to it and .lmp/servers.env hands it to the clients"
        )
    if host not in ("127.0.0.1", "localhost") and backend != "postgresql":
        raise ServersError(
            f"--host {host} would let other hosts reach servers that ask for no credentials; add --backend "
            "postgresql (MLflow's basic auth and Prefect's auth string on), or keep 127.0.0.1"
        )
    if backend == "postgresql" and (lacking := [m for m in ("psycopg2", "flask_wtf") if find_spec(m) is None]):
        raise ServersError(
            f"--backend postgresql needs {' and '.join(lacking)} (MLflow's PostgreSQL driver and basic-auth app): "
            'pip install -e ".[servers]"'
        )
    if (state := running(workdir)) is not None:
        urls = ", ".join(s["url"] for s in state["servers"].values())
        raise ServersError(f"servers from an earlier `lmp up` are still running ({urls}); run `lmp down` first")
    ports = [("Prefect", prefect_port, host, "prefect"), ("MLflow", mlflow_port, host, "mlflow")]
    if backend == "postgresql":
        ports.append(("PostgreSQL", postgres_port, "127.0.0.1", "postgres"))
    for name, port, address, flag in ports:
        if not port_free(port, address):
            raise ServersError(
                f"port {port} for the {name} server is in use on {address}; pick another with --{flag}-port"
            )
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    base_env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI"):
        base_env.pop(key, None)
    prefect_server_env = base_env | prefect_env(prefect_port, workdir, host)
    mlflow_env = base_env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    database_uri = None
    specs: dict[str, tuple] = {}
    if backend == "postgresql":
        found = secrets(workdir)
        try:
            data = postgres.initialise(workdir / "postgres", found["postgres_password"], logs / "postgres-server.log")
            specs["postgres"] = (postgres.command(data, postgres_port), base_env, None,
                                 f"postgresql://127.0.0.1:{postgres_port}")  # fmt: skip
        except postgres.PostgresError as e:
            raise ServersError(str(e)) from None
        password = {"PGPASSWORD": found["postgres_password"]}  # the servers' only way to the password
        prefect_server_env |= password | {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url(postgres_port, "prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": found["prefect_auth_string"],
        }
        mlflow_env |= password | {
            "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(workdir, postgres_port, found).resolve()),
            "MLFLOW_AUTH_ADMIN_PASSWORD": found["mlflow_password"],  # taken when the user store is first made
            "MLFLOW_FLASK_SERVER_SECRET_KEY": found["mlflow_flask_secret_key"],
        }
        database_uri = postgres.url(postgres_port, "mlflow")
    mlflow_args = mlflow_command(root, mlflow_port, host, database_uri)
    if backend == "postgresql":
        mlflow_args += ["--app-name", "basic-auth"]
    specs["prefect"] = (prefect_command(prefect_port, host), prefect_server_env,
                        f"http://{host}:{prefect_port}/api/health", f"http://{host}:{prefect_port}")  # fmt: skip
    specs["mlflow"] = (mlflow_args, mlflow_env, f"http://{host}:{mlflow_port}/health", f"http://{host}:{mlflow_port}")
    started: dict[str, dict] = {}
    processes: dict[str, subprocess.Popen] = {}
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    try:
        for name, (command, env, _, url) in specs.items():
            log = logs / f"{name}-server.log"
            with open(log, "ab") as out:
                processes[name] = subprocess.Popen(
                    command, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
                )
            started[name] = {"pid": processes[name].pid, "url": url, "log": str(log)}
            if name == "postgres":  # the other two need their databases before they start
                postgres.wait_ready(postgres_port, found["postgres_password"], processes[name], log, deadline)
        # The address to open: MLflow 3's UI starts in its GenAI mode (traces) unless the URL asks for runs.
        started["mlflow"]["ui"] = f"{started['mlflow']['url']}/#/?workflowType=machine_learning"
        for name, (_, _, health, _) in specs.items():
            if health:
                _wait_healthy(health, processes[name], logs / f"{name}-server.log", deadline)
    except BaseException as e:
        for process in reversed(processes.values()):
            _stop_group(process.pid)
        if isinstance(e, postgres.PostgresError):
            raise ServersError(str(e)) from None
        raise
    state = {
        "backend": backend,
        "servers": started,
        "env": {"PREFECT_API_URL": f"{started['prefect']['url']}/api", "MLFLOW_TRACKING_URI": started["mlflow"]["url"]},
    }
    atomic_write_bytes(workdir / STATE, json.dumps(state, indent=2).encode())
    exports = state["env"] | client_credentials(workdir, state)
    lines = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in exports.items())
    atomic_write_bytes(workdir / CLIENT_ENV, lines.encode())  # mode 600: it holds the credentials
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
    """Stop what `lmp up` recorded (whatever is still alive; the database last) and forget it; returns what was
    stopped."""
    state = read_state(workdir)
    if state is None:
        raise ServersError(f"no servers recorded in {Path(workdir) / STATE}; nothing to stop")
    stopped = []
    for name, server in reversed(state["servers"].items()):
        if _alive(server["pid"]):
            _stop_group(server["pid"])
            stopped.append(f"{name} ({server['url']})")
    (Path(workdir) / CLIENT_ENV).unlink(missing_ok=True)
    (Path(workdir) / STATE).unlink(missing_ok=True)
    return stopped
