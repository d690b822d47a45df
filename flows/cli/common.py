"""What every `lmp` command shares: the consoles, the one way to print an error, the global options, and
reading pipelines.yaml with its errors reported as one line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flows.config import ConfigError, PipelinesFile, PipelineSpec, load_pipelines

console = Console()
err = Console(stderr=True)
WORK_DIR = Path(".lmp")
options = {"verbose": False}
"""Global options, set by the app's callback before any command runs."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr; returns the Exit to raise (status 2: bad input)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_error(error: BaseException, code: int = 2) -> typer.Exit:
    """One ``error:`` line for an error in the user's input or environment (the traceback with --verbose)."""
    if options["verbose"]:
        err.print_exception(show_locals=False)
    return fail(str(error), code)


def load(config: Path, pipeline: str | None = None, overrides: list[str] | None = None) -> PipelinesFile:
    """pipelines.yaml, validated with the overrides; a problem is one error line and exit status 2."""
    try:
        return load_pipelines(config, overrides=overrides or (), pipeline=pipeline)
    except ConfigError as e:
        raise fail(str(e)) from None


def pipeline_spec(config: Path, name: str | None, overrides: list[str] | None = None) -> PipelineSpec:
    """One pipeline of pipelines.yaml (the default when ``name`` is None)."""
    pipelines = load(config, name, overrides)
    try:
        return pipelines.get(name)
    except KeyError as e:
        raise fail(f"{e.args[0]} (in {config})") from None
