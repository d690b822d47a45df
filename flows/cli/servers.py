"""`lmp up`, `lmp down`, `lmp schedule`, `lmp ui`: local servers and scheduled runs (registered on `lmp` by
flows.cli.commands)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import WORK_DIR, console, fail, load, options

Backend = Annotated[
    str,
    typer.Option(help="sqlite: each server's own SQLite database, no login. postgresql: a PostgreSQL cluster in "
                 ".lmp/postgres behind both, MLflow's basic auth and Prefect's auth string on."),
]  # fmt: skip
Host = Annotated[
    str, typer.Option(help="Address the two servers listen on; beyond 127.0.0.1 it needs --backend postgresql.")
]


def up(
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect server (UI and API).")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow tracking server (UI and API).")] = 5000,
    backend: Backend = "sqlite",
    host: Host = "127.0.0.1",
    postgres_port: Annotated[int, typer.Option(help="Port of PostgreSQL on 127.0.0.1 (--backend postgresql).")] = 54320,
) -> None:
    """Start a Prefect server and an MLflow tracking server (127.0.0.1 unless --host) and wait until both answer."""
    from flows.ops import servers

    try:
        state = servers.up(
            Path.cwd(), WORK_DIR, prefect_port, mlflow_port, backend=backend, host=host, postgres_port=postgres_port
        )
    except servers.ServersError as e:
        raise fail(str(e)) from None
    console.print(f"Prefect UI  [bold]{state['servers']['prefect']['url']}[/bold]")
    mlflow_server = state["servers"]["mlflow"]
    console.print(f"MLflow UI   [bold]{mlflow_server.get('ui', mlflow_server['url'])}[/bold]", soft_wrap=True)
    if "postgres" in state["servers"]:
        console.print(f"database    {state['servers']['postgres']['url']} (prefect, mlflow, mlflow_auth)")
    console.print("Point clients at them (lmp schedule reads them from .lmp/servers.json by itself):")
    for key, value in state["env"].items():
        console.print(f"  export {key}={value}", markup=False, highlight=False)
    env_file = WORK_DIR / servers.CLIENT_ENV
    if state.get("backend") == "postgresql":
        where = f"{env_file} and {WORK_DIR / servers.SECRETS}"
        console.print(
            f"Credentials (Prefect auth string, MLflow account) are in {where}, readable by you only; a shell takes "
            "all of it with", markup=False, highlight=False, soft_wrap=True
        )  # fmt: skip
    else:
        console.print("or, in a shell:", markup=False, highlight=False)
    console.print(f"  . {env_file}", markup=False, highlight=False)
    console.print("Stop them with `lmp down`.")


def down() -> None:
    """Stop the servers `lmp up` started."""
    from flows.ops import servers

    try:
        stopped = servers.down(WORK_DIR)
    except servers.ServersError as e:
        raise fail(str(e)) from None
    console.print("stopped " + ", ".join(stopped) if stopped else "the recorded servers had already stopped")


Names = Annotated[list[str] | None, typer.Argument(help="Pipelines to serve (default: every scheduled one).")]
ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="Path to the pipelines file.")]
ListFlag = Annotated[bool, typer.Option("--list", help="Show deployments and their next run, then exit.")]
PauseFlag = Annotated[bool, typer.Option("--pause-on-exit", help="Pause the schedules when this stops.")]
Limit = Annotated[int, typer.Option("--limit", help="Flow runs executing at once here (later ones queue).")]


def schedule(
    pipelines: Names = None,
    config: ConfigPath = Path("pipelines.yaml"),
    list_: ListFlag = False,
    pause_on_exit: PauseFlag = False,
    limit: Limit = 1,
) -> None:
    """Serve one Prefect deployment per scheduled pipeline; runs execute here until Ctrl-C.

    Each run re-reads the pipelines file and accepts only the pipeline's name and allow-listed overrides."""
    from flows.ops import servers

    try:
        env = servers.use(WORK_DIR)
    except servers.ServersError as e:
        raise fail(str(e)) from None
    from flows.ops import schedule as scheduling  # imports Prefect: only now that its API is chosen

    if list_:
        table = Table(title=f"scheduled pipelines on {env['PREFECT_API_URL']}")
        for column in ("deployment", "schedule", "active", "next run"):
            table.add_column(column)
        for row in scheduling.listing():
            table.add_row(row["deployment"], row["schedule"], "yes" if row["active"] else "paused", row["next run"])
        console.print(table)
        return
    file = load(config)
    names = pipelines or [name for name, spec in file.pipelines.items() if spec.schedule is not None]
    unknown = [n for n in names if n not in file.pipelines]
    unscheduled = [n for n in names if n in file.pipelines and file.pipelines[n].schedule is None]
    if unknown or unscheduled or not names:
        problems = [f"no pipeline named {n!r}" for n in unknown] + [f"{n!r} has no `schedule:`" for n in unscheduled]
        raise fail("; ".join(problems) or f"no pipeline in {config} has a `schedule:`")
    from prefect import serve

    from flows import tracking

    tracking.configure(Path.cwd())
    os.environ.update(scheduling.run_context_env(config.resolve(), WORK_DIR, Path.cwd()))  # never a run parameter
    deployments = scheduling.deployments([file.pipelines[n] for n in names])
    console.print(f"serving {', '.join(names)} against {env['PREFECT_API_URL']} (Ctrl-C to stop)")
    serve(*deployments, pause_on_shutdown=pause_on_exit, print_starting_message=False, limit=limit)


def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you add auth.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the embedded store and print its address (Ctrl-C stops it)."""
    from flows.ops import servers

    if not servers.port_free(port):  # checked before anything starts: the URL would serve someone else
        raise fail(f"port {port} is in use (another MLflow UI, or `lmp up`?); pick a free one with --port")
    from flows import tracking  # imports MLflow (seconds): only once the port is known to be free

    uri = tracking.configure_project()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    args += ["--host", host, "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):  # the same artifact locations as `lmp run` and `lmp up` (one store)
        args += [*servers.store_artifact_args(Path(uri.removeprefix("sqlite:///"))), "--serve-artifacts"]
    elif artifacts := tracking.artifact_location(uri):
        args += ["--default-artifact-root", artifacts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    address = tracking.ui_url(f"http://{host}:{port}")

    # The server's own start-up notices, deprecation warnings and access log go to a file (--verbose: here).
    log_path = (tracking.project_root(Path.cwd()) or Path.cwd()) / WORK_DIR / "logs" / "mlflow-ui.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"MLflow UI for {uri} at [bold]{address}[/bold] (Ctrl-C to stop)", soft_wrap=True)
    if not options["verbose"]:
        console.print(f"server log: {log_path}", markup=False, highlight=False, soft_wrap=True)
    with open(log_path, "ab") as log:
        output = None if options["verbose"] else log
        proc = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on SIGTERM too, not only Ctrl-C
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        if proc.poll() is None:
            proc.terminate()  # mlflow's workers exit a few seconds after their parent: wait for them
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code:  # the server stopped by itself: say why, from its log
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if not options["verbose"] else []
        raise fail(f"the MLflow server stopped (exit {code}){': ' + tail[0] if tail else ''}; its log: {log_path}", 1)
