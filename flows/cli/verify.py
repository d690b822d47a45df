"""`lmp verify`: replay what produced a registered version and say, item by item, whether it comes out the same.

Registered on the `lmp` app by ``flows.cli.commands``; the work is ``flows.registry.verify`` (no Prefect)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.common import WORK_DIR, console, user_error
from lm.errors import DataError

COLORS = {"identical": "green", "within tolerance": "green", "different": "red", "not compared": "yellow"}


def verify(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Training steps to replay (default: the first checkpoint interval, else all)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Force torch's thread count for the replay.")] = None,
    precision: Annotated[
        Literal["fp32", "bf16"] | None, typer.Option(help="Force train.precision for the replay.")
    ] = None,
) -> None:
    """Rebuild a registered version's data and tokens, replay its first training steps from the recorded config
    and seed, and compare: data and tokenizer digests, the logged training loss and (when every step was
    replayed) the weights. The verdict is recorded as lmp.verify.* tags on the version. Exit 0 when it matches,
    1 when something differs, 2 for an unknown or unverifiable version."""
    from flows import tracking
    from flows.registry import verify as verifying

    tracking.configure_project(write=True)
    try:
        verdict = verifying.verify(
            model_uri, WORK_DIR, Path.cwd(), steps=steps, threads=threads, precision=precision
        )  # fmt: skip
    except DataError as e:
        raise user_error(e) from None
    title = f"{verdict.name} v{verdict.version}: {verdict.steps} of {verdict.max_steps} training steps replayed"
    table = Table(title=title, show_header=True)
    table.add_column("item")
    table.add_column("verdict", overflow="fold")
    for item, check in (("data", verdict.data), ("tokenizer", verdict.tokenizer), ("loss history", verdict.loss),
                        ("weights", verdict.weights)):  # fmt: skip
        table.add_row(item, f"[{COLORS[check.outcome]}]{escape(check.detail)}[/]")
    table.add_row("environment", escape("; ".join(verdict.environment)) or "the same as the run's")
    console.print(table)
    if verdict.explanation:
        console.print(verdict.explanation, markup=False, highlight=False, soft_wrap=True)
    console.print(f"recorded on the version as lmp.verify.* (run {verdict.run_id})", highlight=False)
    if not verdict.passed:
        raise typer.Exit(1)
