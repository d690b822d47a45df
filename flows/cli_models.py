"""`lmp compare`, `lmp models`, `lmp promote`, `lmp rollback`, `lmp generate`: the registry workflow.

Each command reads the same MLflow store `lmp run` writes (``MLFLOW_TRACKING_URI`` or the embedded
``sqlite:///mlruns/mlflow.db``); ``flows.cli`` registers them on the `lmp` app.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err = Console(stderr=True)
WORK_DIR = Path(".lmp")

COMPARE_COLUMNS = {  # column → (source in mlflow.search_runs, format)
    "pipeline": ("tags.pipeline", "{}"),
    "run": ("run_id", "{:.8}"),
    "status": ("status", "{}"),
    "architecture": ("params.model.kind", "{}"),
    "init": ("tags.lmp.init_model", "{}"),  # classifiers: the language model version they were initialised from
    "tokenizer": ("params.tokenizer.kind", "{}"),
    "parameters": ("params.num_parameters", "{:,}"),
    "val_bpc": ("metrics.val_bpc", "{:.4f}"),
    "val_loss": ("metrics.val_loss", "{:.4f}"),
    "val_mlm_loss": ("metrics.val_mlm_loss", "{:.4f}"),
    "val_accuracy": ("metrics.val_accuracy", "{:.4f}"),  # classifiers: of labels; language models: of next tokens
    "val_macro_f1": ("metrics.val_macro_f1", "{:.4f}"),
    "baseline_macro_f1": ("metrics.val_baseline_macro_f1", "{:.4f}"),  # always the majority class
    "tokens_per_s": ("metrics.tokens_per_second", "{:,.0f}"),
    "train_s": ("metrics.wall_seconds", "{:.1f}"),
    "wall_s": ("wall_s", "{:.1f}"),  # the MLflow run, start to end
    "version": ("tags.lmp.registered_version", "{}"),
    "started": ("start_time", "{:%Y-%m-%d %H:%M}"),
}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr; returns the Exit to raise (status 2: bad input)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _client():
    from mlflow.tracking import MlflowClient

    from flows import tracking

    tracking.configure(Path.cwd())
    return MlflowClient()


def compare_frame(pipeline: str | None, limit: int):
    """Recent runs of one pipeline (or all), one row each, columns named as in COMPARE_COLUMNS."""
    import mlflow
    import pandas as pd

    client = _client()
    experiments = [e.name for e in client.search_experiments() if pipeline in (None, e.name)]
    if pipeline is not None and not experiments:
        raise fail(f"no runs of pipeline {pipeline!r} in {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs(experiment_names=experiments or None, max_results=limit, order_by=["start_time DESC"])
    if runs.empty:
        return pd.DataFrame(columns=list(COMPARE_COLUMNS))
    runs["wall_s"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    frame = pd.DataFrame({name: runs[src] if src in runs else None for name, (src, _) in COMPARE_COLUMNS.items()})
    frame["parameters"] = pd.to_numeric(frame["parameters"], errors="coerce").astype("Int64")
    return frame


def compare(
    pipeline: Annotated[str | None, typer.Argument(help="Only this pipeline's runs (default: all).")] = None,
    limit: Annotated[int, typer.Option(help="Most recent runs to show.")] = 20,
    format: Annotated[Literal["table", "csv", "json"], typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Recent runs side by side: architecture, size, bits per char (classifiers: init model, accuracy, macro-F1
    and the majority baseline), speed, wall time, registered version."""
    frame = compare_frame(pipeline, limit)
    if format == "csv":
        typer.echo(frame.to_csv(index=False), nl=False)
        return
    if format == "json":
        typer.echo(frame.to_json(orient="records", date_format="iso"))
        return
    table = Table(title=f"runs of {pipeline}" if pipeline else "recent runs", show_lines=False)
    shown = [c for c in COMPARE_COLUMNS if frame[c].notna().any()] if len(frame) else list(COMPARE_COLUMNS)
    for column in shown:
        table.add_column(column, justify="right" if column not in ("pipeline", "run", "status") else "left")
    for _, row in frame.iterrows():
        table.add_row(*(_cell(row[c], COMPARE_COLUMNS[c][1]) for c in shown))
    Console(width=max(console.width, 200) if not console.is_terminal else None).print(table)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        if value is not None and str(value) in ("<NA>", "NaT"):
            return ""
        return fmt.format(int(value) if fmt == "{:,}" else value)
    except (TypeError, ValueError):
        return str(value)


def models(
    model: Annotated[str | None, typer.Argument(help="Only this registered model (default: all).")] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Each version's promotion history (oldest first) instead.")
    ] = False,
    format: Annotated[Literal["table", "json"], typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Registered models: versions, aliases and the champion's headline metric; with --history every gate
    decision, forced promotion and rollback per version (who, when, why, both numbers)."""
    client = _client()
    registered = _registered_models(client, model)
    if history:
        return _show_history(client, [m.name for m in registered], format)
    rows = []
    for found in registered:
        versions = client.search_model_versions(f"name = '{found.name}'")
        headline = ""
        if "champion" in found.aliases:
            tags = client.get_model_version(found.name, str(found.aliases["champion"])).tags
            key = next((k for k in ("val_bpc", "val_macro_f1", "val_mlm_loss") if k in tags), "val_bpc")
            headline = f"{key} {tags.get(key, '?')}"
        aliases = {a: int(v) for a, v in sorted(found.aliases.items(), key=lambda kv: kv[0])}
        rows.append({"model": found.name, "versions": len(versions), "aliases": aliases, "champion_metric": headline})
    if format == "json":
        typer.echo(json.dumps(rows))
        return
    table = Table(title="registered models")
    for column in ("model", "versions", "aliases", "champion metric"):
        table.add_column(column)
    for row in rows:
        aliases = ", ".join(f"@{a} → v{v}" for a, v in row["aliases"].items())
        table.add_row(row["model"], str(row["versions"]), aliases or "-", row["champion_metric"])
    _wide().print(table)


def _registered_models(client, model: str | None) -> list:
    """Every registered model, or just ``model`` (an unknown name is a clear error)."""
    import mlflow

    found = [m for m in client.search_registered_models() if model in (None, m.name)]
    if model is not None and not found:
        raise fail(f"no registered model {model!r} in {mlflow.get_tracking_uri()} (see `lmp models`)")
    return found


HISTORY_COLUMNS = ("model", "version", "when", "event", "who", "challenger", "champion", "forced", "reason", "detail")


def _show_history(client, names: list[str], format: str) -> None:
    """The promotion history of each version of ``names``: per version, newest last."""
    from flows import promotion

    rows = [entry for name in names for entry in promotion.history(client, name)]
    if format == "json":
        typer.echo(json.dumps(rows))
        return
    table = Table(title="promotion history", show_lines=False)
    for column in HISTORY_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            escape(row["model"]),
            f"v{row['version']}",
            row.get("when", ""),
            row.get("event", ""),
            escape(row.get("who", "")),
            _side(row, "challenger"),
            _side(row, "champion"),
            "yes" if row.get("forced") else "",
            escape(row.get("reason", "")),
            escape(row.get("detail", "")),
        )
    _wide().print(table)


def _wide() -> Console:
    """The terminal's console, or a 200-column one when output goes to a file or pipe (no wrapped cells)."""
    return Console(width=max(console.width, 200) if not console.is_terminal else None)


def _side(row: dict, side: str) -> str:
    """``v3 2.41`` — a side of a history entry: its version and, for a gate, its metric value."""
    version, value = row.get(f"{side}_version"), row.get(side)
    text = f"v{version}" if version is not None else "-"
    if value is not None:
        text += f" {value:.6g}" if isinstance(value, float | int) else f" {value}"
    return text


def _promote_config(name: str, version_tags: dict, config: Path):
    """The gate of pipeline ``name`` in the config file, else the default gate for the version's metrics."""
    from flows.config import ConfigError, PromoteConfig, load_pipelines

    try:
        return load_pipelines(config).get(name)
    except (ConfigError, KeyError, OSError):
        metric = "val_bpc" if "val_bpc" in version_tags else "val_mlm_loss"
        return PromoteConfig(metric=metric)


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name (the pipeline's name).")],
    version: Annotated[int | None, typer.Option("--version", help="Version to promote (default: @challenger).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate fails (recorded).")] = False,
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipelines file with the gate.")] = Path(
        "pipelines.yaml"
    ),
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the promotion history).")] = "",
) -> None:
    """Run the promotion gate for a version against @champion and move the aliases if it passes (under the
    model's promotion lock; every decision is appended to the version's history)."""
    from flows import promotion, registry
    from flows.config import ClassifierSpec, PipelineSpec

    client = _client()
    target = (
        promotion.alias_version(client, model, "challenger")
        if version is None
        else _get_version(client, model, version)
    )
    if target is None:
        raise fail(f"registered model {model!r} has no @challenger; pass --version N")
    found = _promote_config(model, target.tags, config)
    spec = found if isinstance(found, PipelineSpec | ClassifierSpec) else None
    gate = spec.promote if spec else found
    evaluate = None
    digest = target.tags.get("data_digest", "")[:16]
    data = WORK_DIR / ("labelled" if target.tags.get("task") == "classification" else "data") / digest
    if spec is not None and ((data / "val.txt").is_file() or (data / "val.jsonl").is_file()):
        evaluate = registry.champion_evaluator(spec, data, WORK_DIR / "promote")
    try:
        decision = promotion.run_gate(client, model, target, gate, evaluate, force=force, reason=reason)
    except promotion.PromotionConflict as e:
        raise fail(str(e), code=1) from None
    verdict = "[green]promoted to @champion[/green]" if decision.promoted else "[yellow]not promoted[/yellow]"
    console.print(f"{model} v{target.version}: {verdict} — {escape(decision.reason)}")
    if not decision.promoted:
        raise typer.Exit(1)


def _get_version(client, model: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model, str(version))
    except MlflowException:
        raise fail(f"registered model {model!r} has no version {version}") from None


def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the promotion history).")] = "",
) -> None:
    """Make @previous the @champion again (recorded in both versions' promotion history)."""
    from flows import promotion

    try:
        restored, demoted = promotion.rollback(_client(), model, reason=reason)
    except LookupError as e:
        raise fail(str(e)) from None
    except promotion.PromotionConflict as e:
        raise fail(str(e), code=1) from None
    console.print(f"{model}: @champion → v{restored} (v{demoted} demoted)")


def generate(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION (or runs:/…).")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (1 to LMP_MAX_NEW_TOKENS_CAP, 4096).")] = 200,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="0: no top-k filter.")] = 40,
    top_p: Annotated[float, typer.Option(help="1.0: no nucleus filter.")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    stop: Annotated[str, typer.Option(help="End at (and include) this string.")] = "",
) -> None:
    """Load a registered model (pickle-free pyfunc) and print its continuation of PROMPT. The served model's
    limits apply (LMP_MAX_NEW_TOKENS_CAP, LMP_GENERATION_SECONDS, LMP_MAX_PROMPT_CHARS): a param out of range
    is refused (exit 2), and generation stops at the time budget with what it has."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _client()
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise fail(f"cannot load {model_uri}: {str(e).splitlines()[0]}") from None
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    try:
        output = loaded.predict([prompt], params=params | {"seed": seed, "stop": stop})[0]
    except MlflowException as e:  # the model's own one-line check of the params and the prompt
        raise fail(e.message.splitlines()[0]) from None
    console.print(output if isinstance(output, str) else json.dumps(output), markup=False, highlight=False)
