"""`lmp`: run, list and inspect the pipelines in pipelines.yaml."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flows.cli import export as cli_export
from flows.cli import models as cli_models
from flows.cli import servers as cli_servers
from flows.cli import verify as cli_verify
from flows.cli.common import WORK_DIR, console, err, fail, load, options, pipeline_spec, user_error
from flows.config import ConfigError, PipelineSpec
from flows.ops import gc as gc_command
from lm.errors import DataError
from lm.metrics import METRICS as METRIC_TABLE

app = typer.Typer(add_completion=True, no_args_is_help=True, help=__doc__)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Path to the pipelines file.")]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option(
        "--override",
        "-o",
        metavar="KEY=VALUE",
        help="Set a key of the pipeline's config for this command, e.g. -o train.max_steps=200 (repeatable).",
    ),
]
# MLflow's switches for output that tells an `lmp` user nothing: tqdm bars for local artifact copies, the
# "View run … at …" lines at the end of every run on a server (the summary prints the run's page), and its INFO
# log lines (new database tables, "Skip logging GPU metrics", system-metrics start/stop). A value the user set
# wins; --verbose keeps MLflow's INFO lines.
QUIET_MLFLOW = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"lmp {version('lm-pipelines')}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show tracebacks and Prefect's and MLflow's own log lines (or LMP_DEBUG=1)."),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print lmp's version and exit.")
    ] = False,
) -> None:
    options["verbose"] = verbose or os.environ.get("LMP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    quiet = QUIET_MLFLOW if options["verbose"] else QUIET_MLFLOW | {"MLFLOW_LOGGING_LEVEL": "WARNING"}
    for name, value in quiet.items():
        os.environ.setdefault(name, value)  # before MLflow is imported: it reads its logging level then


class _EngineChatter(logging.Filter):
    """What Prefect's engine says on the console about each flow and task run: "Beginning flow run", "View at
    <URL>", "Finished in state Completed()", and a failure with its traceback twice (task, then flow). `lmp`
    shows progress and the summary, and reports an error itself (one line, the traceback with --verbose), so
    the console drops those records — the Prefect API still receives every one. The engine's warnings stay, a
    retry notice stays (as one line), and so does every line the pipeline logs itself (stage reports, resume
    and training-slot notices)."""

    def __init__(self, prefect_dir: str):
        super().__init__()
        self.prefect_dir = prefect_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        if not record.pathname.startswith(self.prefect_dir):
            return True  # the pipeline's own line
        if record.levelno < logging.ERROR:
            return record.levelno >= logging.WARNING
        if " - Retry " in record.getMessage():  # the console handler runs last: the API already has the traceback
            record.exc_info, record.exc_text = None, None
            return True
        return False


def _quiet_prefect() -> None:
    """Prefect's console without the engine's chatter (see ``_EngineChatter``); --verbose keeps everything."""
    if options["verbose"]:
        return
    import prefect
    from prefect.logging.handlers import PrefectConsoleHandler

    for worker in ("EventsWorker", "APILogWorker"):  # "Still processing items: …" while draining at exit
        logging.getLogger(worker).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _EngineChatter) for f in handler.filters
        ):
            handler.addFilter(_EngineChatter(str(Path(prefect.__file__).parent)))


def _progress_listener(progress: Progress, spec: PipelineSpec):
    """Training's metric rows → the progress bar, which appears with the first training loss (no bar stuck at
    "step 0 loss nan" when a run ends before training)."""
    bars: list = []

    def listener(step: int, metrics) -> None:
        if "train_loss" not in metrics:
            if bars:
                progress.update(bars[0], completed=step)
            return
        fields = {"loss": metrics["train_loss"], "rate": metrics.get("tokens_per_second", 0.0)}
        if not bars:
            bars.append(progress.add_task("train", total=spec.train.max_steps, **fields))
            progress.start()
        progress.update(bars[0], completed=step, **fields)

    return listener


@contextmanager
def _progress(columns: list) -> Iterator[Progress]:
    """A progress display that starts with its first bar (the listener adds it) and vanishes when the run ends
    in an error or a stop: the message says where it ended, a frozen bar would only repeat it."""
    progress = Progress(*columns, console=console, transient=False)
    try:
        yield progress
    except BaseException:
        progress.live.transient = True
        for task in progress.task_ids:
            progress.update(task, visible=False)
        progress.live.stop()  # not Progress.stop(): on a non-terminal that prints an empty line
        raise
    if progress.live.is_started:
        progress.stop()


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
    overrides: OverrideOption = None,
) -> None:
    """Run one pipeline end to end: ingest, tokenize, train, evaluate, register.

    An interrupted earlier run of the same pipeline resumes from its newest valid checkpoint."""
    spec = pipeline_spec(config, pipeline, overrides)
    from flows.ops import prefect_server

    # Boot Prefect's temporary API server (≈ 5 s) while the imports below run (≈ 4 s).
    server = prefect_server.start_if_needed(WORK_DIR / "logs" / "prefect-server.log")
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: 1.7 s, better paid here)

    from flows import tracking
    from flows.pipeline import lm_pipeline, stopped_message  # imported late: prefect, mlflow and torch cost
    from flows.prefect_links import mlflow_run_link
    from flows.resume import STOP
    from flows.torchrun import RankFailed
    from lm.training import TrainingInterrupted

    _quiet_prefect()
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
        with _progress(columns) as progress:
            with tracking.listening(_progress_listener(progress, spec)), _heartbeats(server is None):
                result = lm_pipeline(spec, workdir=str(WORK_DIR), base_dir=str(Path.cwd()), fresh=fresh)
    except (DataError, ConfigError) as e:  # bad input, a refused resume, a missing model: the user's to fix
        raise user_error(e) from None
    except (RankFailed, tracking.TrackingUnavailable) as e:  # a rank died; the tracking server stayed away
        raise user_error(e, code=1) from None
    except TrainingInterrupted as e:
        err.print(escape(stopped_message(e)), highlight=False, soft_wrap=True)
        raise typer.Exit(128 + (STOP.signal or signal.SIGTERM)) from None
    console.print(_summary(spec, result, time.perf_counter() - started, uri))
    console.print(f"view the run: {mlflow_run_link(result['run_id'])}", highlight=False, soft_wrap=True)
    console.print("[bold]sample[/bold]")
    console.print(result["sample"], markup=False, highlight=False)


def _summary(spec: PipelineSpec, result: dict, wall: float, uri: str) -> Table:
    """The run in a few rows: headline metrics, time, stages, what the gate decided and where to look."""
    from flows.registry.promotion import verdict

    metrics, registered = result["metrics"], result["registered"]
    table = Table(title=f"{spec.name}: done", show_header=False)
    for key in result["summary_metrics"]:  # the task's headline rows; labels and units come from lm.metrics
        if key in metrics:
            m = METRIC_TABLE[key]
            table.add_row(m.label, f"{metrics[key]:.4f} {m.unit}".rstrip())
    if layers := result["train"].get("card", {}).get("architecture"):
        table.add_row("architecture", f"{layers} ({result['train']['card']['num_parameters']:,} parameters)")
    table.add_row(
        "wall time",
        f"{wall:.1f} s (training {result['train']['wall_seconds']:.1f} s, "
        f"{result['train']['tokens_per_second']:,.0f} tokens/s)",
    )
    if stages := result.get("stages"):
        table.add_row("stages", ", ".join(f"{k} {'cached' if v else 'built'}" for k, v in stages.items()))
    if result.get("resumed_from_step"):
        table.add_row("resumed", f"from the checkpoint at step {result['resumed_from_step']} (same MLflow run)")
    reused = "" if registered.get("created", True) else " (reused: same weights)"
    table.add_row("registered", f"{registered['uri']}{reused}")
    table.add_row(
        "gate", verdict(registered.get("decision"), registered["version"], created=registered.get("created", True))
    )
    table.add_row("MLflow run", f"{result['run_id']} in {uri}")
    return table


@app.command()
def sweep(
    pipeline: Annotated[str, typer.Argument(help="Pipeline with a `sweep:` section.")],
    config: ConfigOption = Path("pipelines.yaml"),
    overrides: OverrideOption = None,
) -> None:
    """Run the pipeline's hyperparameter sweep on a Dask cluster: a live table of the trials, then the
    ranking; the best trial's model is registered and gated."""
    spec = pipeline_spec(config, pipeline, overrides)
    if spec.sweep is None:
        raise fail(f"pipeline {spec.name!r} has no `sweep:` section; add one (see README, Scaling out)")
    from flows.ops import prefect_server

    server = prefect_server.start_if_needed(WORK_DIR / "logs" / "prefect-server.log")
    from flows import sweep as sweeping
    from flows import tracking

    _quiet_prefect()
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
    overrides: OverrideOption = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-hash the cached corpus and token shards (a run checks sizes only).")
    ] = False,
) -> None:
    """Say, without running anything, which stages the next run reuses from cache and why the others run.

    With --verify, cached data is re-hashed against its recorded digests; a damaged corpus or token shard is
    named, set aside, and rebuilt by the next run."""
    from lm import tasks

    spec = pipeline_spec(config, pipeline, overrides)
    from flows import tracking
    from flows.resume import pending_resume

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(Path.cwd())
    resume = pending_resume(spec, WORK_DIR, uri)  # reads the store only: nothing is started, marked or created
    table = Table(title=f"plan: {spec.name}")
    for column in ("stage", "status", "reason"):
        table.add_column(column)
    for step in tasks.of(spec).plan(WORK_DIR, Path.cwd(), resume, verify=verify):
        color = {"cached": "green", "refused": "red"}.get(step.status, "yellow")
        status = f"[{color}]{step.status}[/{color}]"
        table.add_row(step.stage, status, step.reason)
    console.print(table)


@app.command("list")
def list_pipelines(config: ConfigOption = Path("pipelines.yaml")) -> None:
    """The pipelines in the config file, one line each."""
    pipelines = load(config)
    table = Table(show_header=True)
    table.add_column("pipeline")
    table.add_column("model")
    table.add_column("description")
    for name, spec in pipelines.pipelines.items():
        marker = " (default)" if name == pipelines.default else ""
        table.add_row(name + marker, spec.model_summary(), spec.description)
    console.print(table)


for _command in (cli_models.compare, cli_models.models, cli_models.promote, cli_models.rollback, cli_models.generate):
    app.command()(_command)
app.command()(cli_export.export)
app.command()(cli_servers.up)
app.command()(cli_servers.down)
app.command()(cli_servers.schedule)
app.command()(cli_servers.ui)
app.command()(gc_command.gc)
app.command()(cli_verify.verify)


def _report_error(error: Exception) -> int:
    """One ``error:`` line for an error no command handled — what a damaged or read-only store means and what
    to do, the tracking server that stayed away, or the error itself — and the exit status (2: a damaged
    store; 1: anything else). The traceback only with ``--verbose``."""
    if options["verbose"]:
        err.print_exception(show_locals=False)
    message, code, known = f"{type(error).__name__}: {error}", 1, False
    from flows.ops.credentials import refusal

    if (refused := refusal(error)) is not None:
        message, code, known = refused, 2, True
    elif "mlflow" in sys.modules:
        from flows import tracking

        cause, stopped = tracking.store_error(error), _in_chain(error, tracking.TrackingUnavailable)
        if cause is not None:
            message, code, known = str(cause), cause.exit_code, True
        elif stopped is not None:
            message, known = str(stopped), True
    first = (message.strip().splitlines() or [type(error).__name__])[0]
    hint = "" if known or options["verbose"] else " (`lmp --verbose …` shows the traceback)"
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
