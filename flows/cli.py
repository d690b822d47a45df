"""`lmp`: run, list and inspect the pipelines in pipelines.yaml."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flows import cli_models, cli_servers
from flows.cli_models import fail
from flows.config import ConfigError, PipelinesFile, PipelineSpec, load_pipelines
from lm.errors import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)
WORK_DIR = Path(".lmp")
SUMMARY_METRICS = {
    "val_macro_f1": ("macro-F1", "(validation)"),
    "val_accuracy": ("accuracy", "(validation)"),
    "val_baseline_macro_f1": ("majority-class macro-F1", "(validation baseline)"),
    "val_loss": ("validation loss", "nats/token"),
    "val_bpc": ("bits per char", ""),
    "val_mlm_loss": ("masked-token loss", "nats/token (validation)"),
}
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Path to the pipelines file.")]
_options = {"verbose": False}


@app.callback()
def _global_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show an error's traceback, not only its message.")
    ] = False,
) -> None:
    _options["verbose"] = verbose


def _load(config: Path) -> PipelinesFile:
    try:
        return load_pipelines(config)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _spec(config: Path, name: str | None) -> PipelineSpec:
    pipelines = _load(config)
    try:
        return pipelines.get(name)
    except KeyError as e:
        err.print(f"[red]error:[/red] {escape(e.args[0])} (in {escape(str(config))})", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _progress_listener(progress: Progress, spec: PipelineSpec):
    bar = progress.add_task("train", total=spec.train.max_steps, loss=float("nan"), rate=0.0)

    def listener(step: int, metrics) -> None:
        fields = {}
        if "train_loss" in metrics:
            fields = {"loss": metrics["train_loss"], "rate": metrics["tokens_per_second"]}
        progress.update(bar, completed=step, **fields)

    return listener


def _heartbeats(enabled: bool):
    """Flow-run heartbeats let a long-lived Prefect server mark a crashed run; a temporary server dies
    with this process, so there they only cost time (≈ 1 s per flow run, joining the thread)."""
    if enabled:
        return nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@app.command()
def run(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name (default: the file's `default`).")] = None,
    config: ConfigOption = Path("pipelines.yaml"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Do not resume an interrupted run; start a new one.")] = False,
) -> None:
    """Run one pipeline end to end: ingest, tokenize, train, evaluate, register.

    An interrupted earlier run of the same pipeline resumes from its newest valid checkpoint."""
    spec = _spec(config, pipeline)
    from flows import prefect_server

    # Boot Prefect's temporary API server (≈ 5 s) while the imports below run (≈ 4 s).
    server = prefect_server.start_if_needed(WORK_DIR / "logs" / "prefect-server.log")
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: 1.7 s, better paid here)

    from flows import tracking
    from flows.pipeline import lm_pipeline  # imported late: prefect, mlflow and torch start-up is not free
    from flows.resume import STOP
    from flows.torchrun import RankFailed
    from lm.training import TrainingInterrupted

    uri = tracking.configure(Path.cwd(), write=True)
    if server is not None:
        try:
            server.ready()
        except prefect_server.ServerError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    started = time.perf_counter()
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[rate]:,.0f} tok/s"),
        TimeRemainingColumn(),
    ]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            with tracking.listening(_progress_listener(progress, spec)), _heartbeats(server is None):
                result = lm_pipeline(spec, workdir=str(WORK_DIR), base_dir=str(Path.cwd()), fresh=fresh)
    except DataError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except RankFailed as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except tracking.TrackingUnavailable as e:  # the tracking server stayed away: stopped at a checkpoint
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except TrainingInterrupted as e:
        err.print(f"stopped: {escape(str(e))}. Run the same command again to resume.", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + (STOP.signal or signal.SIGTERM)) from None
    wall = time.perf_counter() - started
    metrics = result["metrics"]
    table = Table(title=f"{spec.name}: done", show_header=False)
    for key, (label, unit) in SUMMARY_METRICS.items():
        if key in metrics:
            unit = "nats/example" if key == "val_loss" and "val_macro_f1" in metrics else unit
            table.add_row(label, f"{metrics[key]:.4f} {unit}".rstrip())
    table.add_row(
        "wall time",
        f"{wall:.1f} s (training {result['train']['wall_seconds']:.1f} s, "
        f"{result['train']['tokens_per_second']:,.0f} tokens/s)",
    )
    if result.get("resumed_from_step"):
        table.add_row("resumed", f"from the checkpoint at step {result['resumed_from_step']} (same MLflow run)")
    table.add_row("registered", result["registered"]["uri"])
    table.add_row("MLflow run", f"{result['run_id']} in {uri}")
    console.print(table)
    console.print("[bold]sample[/bold]")
    console.print(result["sample"], markup=False, highlight=False)


@app.command()
def sweep(
    pipeline: Annotated[str, typer.Argument(help="Pipeline with a `sweep:` section.")],
    config: ConfigOption = Path("pipelines.yaml"),
) -> None:
    """Run the pipeline's hyperparameter sweep on a Dask cluster: a live table of the trials, then the
    ranking; the best trial's model is registered and gated."""
    spec = _spec(config, pipeline)
    if spec.sweep is None:
        raise fail(f"pipeline {spec.name!r} has no `sweep:` section; add one (see README, Scaling out)")
    from flows import prefect_server

    server = prefect_server.start_if_needed(WORK_DIR / "logs" / "prefect-server.log")
    from flows import sweep as sweeping
    from flows import tracking

    tracking.configure(Path.cwd(), write=True)
    if server is not None:
        server.ready()
    started = time.time()
    runner = sweeping.task_runner(spec.sweep, WORK_DIR)
    with sweeping.live_table(spec, started, console):
        try:
            result = sweeping.lm_sweep.with_options(task_runner=runner)(spec, str(WORK_DIR), str(Path.cwd()))
        except DataError as e:
            raise fail(str(e)) from None
    metric = result["metric"]
    table = Table(title=f"{spec.name}: ranking by {metric} ({spec.promote.mode})")
    for column in ("rank", "trial", *spec.sweep.parameters, metric, "run"):
        table.add_column(column)
    for i, r in enumerate(result["ranking"], 1):
        values = [str(r["values"][k]) for k in spec.sweep.parameters]
        table.add_row(str(i), str(r["trial"]), *values, f"{r[metric]:.4f}", r["run_id"][:8])
    console.print(table)
    if result["failed"]:
        err.print(f"[yellow]{len(result['failed'])} trial(s) failed:[/yellow] {result['failed']}")
    console.print(f"registered {result['registered']['uri']} (parent run {result['parent_run_id']})")


@app.command()
def plan(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name (default: the file's `default`).")] = None,
    config: ConfigOption = Path("pipelines.yaml"),
) -> None:
    """Say, without running anything, which stages the next run reuses from cache and why the others run."""
    from lm.plan import plan as make_plan

    spec = _spec(config, pipeline)
    table = Table(title=f"plan: {spec.name}")
    for column in ("stage", "status", "reason"):
        table.add_column(column)
    if spec.task == "classification":
        from lm.plan import plan_classification

        steps = plan_classification(
            spec.name, spec.data, init_from=spec.init_from, workdir=WORK_DIR, base_dir=Path.cwd()
        )
    else:
        steps = make_plan(spec.name, spec.data, spec.tokenizer, workdir=WORK_DIR, base_dir=Path.cwd())
    for step in steps:
        status = "[green]cached[/green]" if step.status == "cached" else "[yellow]run[/yellow]"
        table.add_row(step.stage, status, step.reason)
    console.print(table)


@app.command("list")
def list_pipelines(config: ConfigOption = Path("pipelines.yaml")) -> None:
    """The pipelines in the config file, one line each."""
    pipelines = _load(config)
    table = Table(show_header=True)
    table.add_column("pipeline")
    table.add_column("model")
    table.add_column("description")
    for name, spec in pipelines.pipelines.items():
        marker = " (default)" if name == pipelines.default else ""
        m = spec.model
        if m is None:  # a classifier initialised from a registered model
            shape = f"classifier on {spec.init_from}"
        else:
            width = getattr(m, "hidden_dim", m.embed_dim)
            shape = f"{m.kind} {m.num_layers}×{width}, ctx {m.context_length}"
            shape = f"classifier on {shape}" if spec.task == "classification" else shape
        table.add_row(name + marker, shape, spec.description)
    console.print(table)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you add auth.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the embedded store and print its address (Ctrl-C stops it)."""
    from flows import tracking

    uri = tracking.configure(Path.cwd())
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts := tracking.artifact_location(uri):
        args += ["--default-artifact-root", artifacts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    console.print(f"MLflow UI for {uri} at [bold]http://{host}:{port}[/bold] (Ctrl-C to stop)")
    proc = subprocess.Popen(args, env=env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on SIGTERM too, not only Ctrl-C
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()  # mlflow's workers exit a few seconds after their parent: wait for them
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


for _command in (cli_models.compare, cli_models.models, cli_models.promote, cli_models.rollback, cli_models.generate):
    app.command()(_command)
app.command()(cli_servers.up)
app.command()(cli_servers.down)
app.command()(cli_servers.schedule)


def _report_error(error: Exception) -> int:
    """One ``error:`` line for an error no command handled — what a damaged or read-only store means and what
    to do, the tracking server that stayed away, or the error itself — and the exit status (2: a damaged
    store; 1: anything else). The traceback only with ``--verbose``."""
    if _options["verbose"]:
        err.print_exception(show_locals=False)
    message, code, known = f"{type(error).__name__}: {error}", 1, False
    if "mlflow" in sys.modules:
        from flows import tracking

        cause, stopped = tracking.store_error(error), _in_chain(error, tracking.TrackingUnavailable)
        if cause is not None:
            message, code, known = str(cause), cause.exit_code, True
        elif stopped is not None:
            message, known = str(stopped), True
    first = (message.strip().splitlines() or [type(error).__name__])[0]
    hint = "" if known or _options["verbose"] else " (`lmp --verbose …` shows the traceback)"
    err.print(f"[red]error:[/red] {escape(first)}{hint}", highlight=False, soft_wrap=True)
    return code


def _in_chain(error: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main() -> None:
    """The `lmp` console script: run the command, make everything durable, then end the process at once.

    A normal interpreter exit after a run spends ≈ 2 s tearing down torch, TorchDynamo and Prefect's
    threads with nothing left to do. Here Prefect's log/event workers are drained and the atexit
    handlers (MLflow, the temporary Prefect server) run explicitly before ``os._exit``.
    """
    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 — every error ends in one line (the traceback with --verbose)
        code = _report_error(e)
    if "prefect" in sys.modules:
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
