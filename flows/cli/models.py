"""`lmp compare`, `lmp models`, `lmp promote`, `lmp rollback`, `lmp generate`: the registry workflow.

Each command reads the same MLflow store `lmp run` writes (``MLFLOW_TRACKING_URI`` or the embedded
``sqlite:///mlruns/mlflow.db``); ``flows.cli.commands`` registers them on the `lmp` app.
"""

from __future__ import annotations

import json
import math
import operator
import re
import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli.common import WORK_DIR, console, fail
from lm.metrics import GATE_METRICS, HEADLINE, METRICS, PER_TASK_OBJECTIVE, RENAMED, TASKS, describe, metric

COMPARE_COLUMNS = {  # column → (source in mlflow.search_runs, format); metric columns come from lm.metrics
    "pipeline": ("tags.pipeline", "{}"),
    "run": ("run_id", "{:.8}"),
    "status": ("status", "{}"),
    "task": ("task", "{}"),  # inferred per run (_task): says which metric columns it can fill
    "data": ("data", "{}"),  # the data digest (12 hex): runs on different data are not comparable
    "architecture": ("params.model.kind", "{}"),
    "init": ("tags.lmp.init_model", "{}"),  # classifiers: the language model version they were initialised from
    "tokenizer": ("params.tokenizer.kind", "{}"),
    "parameters": ("params.num_parameters", "{:,}"),
}
TAIL_COLUMNS = {
    "tokens_per_s": ("metrics.tokens_per_second", "{:,.0f}"),
    "train_s": ("metrics.wall_seconds", "{:.1f}"),
    "wall_s": ("wall_s", "{:.1f}"),  # the MLflow run, start to end
    "version": ("tags.lmp.registered_version", "{}"),
    "started": ("start_time", "{:%Y-%m-%d %H:%M}"),
}
COMPARE_METRICS = (  # shown by default, each task's headline first; --sort/--where add the metric they name
    "val_bpc", "val_loss", "val_accuracy", "val_mlm_loss", "val_macro_f1", "val_label_accuracy",
    "val_loss_per_example", "val_baseline_macro_f1", "val_chrf", "val_rougeL", "val_exact_match", "val_target_loss",
)  # fmt: skip
DIGEST_CHARS = 12
SEARCH_CAP = 5000  # runs read when --where/--sort choose among more than the most recent --limit
WHERE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*(?P<op><=|>=|!=|=|<|>)\s*(?P<value>.*?)\s*$")
OPS = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(@[^/]+|/\d+)/?$")
PREFIX_COLUMNS = ("run", "data")  # `=` matches a prefix: people paste the short form the table shows


def _client():
    from mlflow.tracking import MlflowClient

    from flows import tracking

    tracking.configure_project()
    return MlflowClient()


def _task(row) -> str | None:
    """A run's task key (lm.metrics.TASKS) from its tags, params and metrics; None when nothing says."""

    def has(key):
        value = row.get(key)
        return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""

    if has("tags.task") and row["tags.task"] in TASKS:
        return row["tags.task"]
    if has("tags.lmp.init_from") or has("metrics.val_macro_f1") or has("metrics.val_label_accuracy"):
        return "classification"  # every classifier run records where it started (a model URI or "scratch")
    if row.get("params.model.kind") == "encoder" or has("metrics.val_mlm_loss"):
        return "mlm"
    if has("params.model.kind") or has("metrics.val_bpc"):
        return "causal"
    return None


def _upgrade_renamed(runs) -> None:
    """Classifier runs logged before metric names were unique: their `val_loss` (nats per example) and
    `val_accuracy` (of labels) move to today's names, so a column never holds two units."""
    classifier = runs["task"] == "classification"
    for old, new in RENAMED.items():
        if f"metrics.{old}" not in runs:
            continue
        if f"metrics.{new}" not in runs:
            runs[f"metrics.{new}"] = math.nan
        moved = classifier & runs[f"metrics.{new}"].isna()
        runs.loc[moved, f"metrics.{new}"] = runs.loc[moved, f"metrics.{old}"]
        runs.loc[classifier, f"metrics.{old}"] = math.nan


def _parse_where(expressions: list[str]) -> list[tuple[str, str, str]]:
    """``KEY OP VALUE`` triples (OP one of = != < <= > >=); a regular expression, never eval."""
    parsed = []
    for text in expressions:
        match = WHERE.match(text)
        if match is None:
            raise fail(f"--where {text!r}: expected KEY OP VALUE, e.g. pipeline=smoke, status=FINISHED, val_bpc<2.5")
        parsed.append((match["key"], match["op"], match["value"].strip("'\"")))
    return parsed


def _metric_names(runs) -> list[str]:
    return [c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")]


def compare_frame(pipeline: str | None, limit: int, where: list[str] = (), sort: str | None = None):
    """Runs of one pipeline (or all), one row each: COMPARE_COLUMNS, the metric columns (one metric name,
    one unit each), TAIL_COLUMNS; filtered by ``where``, newest first or by ``sort`` (in the metric's better
    direction), at most ``limit``."""
    import mlflow
    import pandas as pd

    conditions = _parse_where(list(where))
    client = _client()
    experiments = [e.name for e in client.search_experiments() if pipeline in (None, e.name)]
    if pipeline is not None and not experiments:
        raise fail(f"no runs of pipeline {pipeline!r} in {mlflow.get_tracking_uri()}")
    many = SEARCH_CAP if conditions or sort else limit
    runs = mlflow.search_runs(experiment_names=experiments or None, max_results=many, order_by=["start_time DESC"])
    wanted = [m for m in dict.fromkeys([*COMPARE_METRICS, *([sort] if sort else []), *(k for k, _, _ in conditions)])]
    if sort is not None:
        _check_sort_name(sort, runs)
    if runs.empty:
        return pd.DataFrame(columns=[*COMPARE_COLUMNS, *(m for m in wanted if m in METRICS), *TAIL_COLUMNS])
    runs["wall_s"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    runs["task"] = [_task(row) for row in runs.to_dict("records")]
    _upgrade_renamed(runs)
    runs["data"] = runs["tags.data_digest"].str[:DIGEST_CHARS] if "tags.data_digest" in runs else None
    metrics = [m for m in wanted if m in METRICS and f"metrics.{m}" in runs and runs[f"metrics.{m}"].notna().any()]
    columns = {**COMPARE_COLUMNS, **{m: (f"metrics.{m}", "{:.4f}") for m in metrics}, **TAIL_COLUMNS}
    frame = pd.DataFrame({name: runs[src] if src in runs else None for name, (src, _) in columns.items()})
    frame["parameters"] = pd.to_numeric(frame["parameters"], errors="coerce").astype("Int64")
    frame = _filter(frame, conditions)
    if sort is not None:
        frame = _sort(frame, sort)
    frame = frame.head(limit).reset_index(drop=True)
    frame["task"] = frame["task"].map(lambda t: TASKS.get(t, t) if isinstance(t, str) else None)
    return frame


def _compare_samples(first: str, second: str) -> None:
    """The generation card of two registered versions, in the terminal."""
    from flows.registry import samples
    from lm.errors import DataError
    from lm.samples import STATS, number

    _client()
    try:
        card = samples.compare_versions(first, second, WORK_DIR)
    except DataError as e:
        raise fail(str(e)) from None
    if card is None:
        raise fail(
            f"{first} and {second}: not two text generators of one kind (a classifier or an encoder has no card)"
        )
    out, (a, b) = _wide(), (card.champion, card.challenger)
    out.print(f"{len(card.rows)} prompts; {card.settings}", markup=False, highlight=False)
    for note in card.notes:
        out.print(note, markup=False, highlight=False)
    summary = Table(title="means")
    for column in ("", a, b, "Δ (B − A)"):
        summary.add_column(escape(column), justify="left" if not column else "right")
    for stat, (x, y, delta) in card.summary().items():
        form = STATS[stat][1]
        summary.add_row(escape(card.label(stat)), *(number(form, v) for v in (x, y)), f"{delta:+.3f}")
    out.print(summary)
    table = Table(show_lines=True)
    for column in ("prompt", a, b):
        table.add_column(escape(column), overflow="fold")
    for row in card.rows:
        prompt = row.prompt.text + (
            f"\n(reference: {row.prompt.reference})" if row.prompt.reference is not None else ""
        )
        table.add_row(escape(prompt), *(escape(o.text) + "\n[dim]" + escape(_brief(card, o)) + "[/dim]"
                                        for o in (row.champion, row.challenger)))  # fmt: skip
    out.print(table)


def _brief(card, output) -> str:
    """One line of an output's statistics."""
    from lm.samples import number

    return " · ".join(f"{card.label(s)} {number('{:.3g}', getattr(output, s))}" for s in card.stats())


def _filter(frame, conditions: list[tuple[str, str, str]]):
    """Rows meeting every ``KEY OP VALUE``: numbers compared as numbers, text with = and != only."""
    import pandas as pd

    for key, op, value in conditions:
        if key not in frame:
            known = [c for c in frame.columns if c not in ("started",)]
            if key in METRICS:  # a known metric no run here logged: nothing matches
                return frame.iloc[0:0]
            raise fail(f"--where {key}{op}{value}: no column {key!r}; columns: {', '.join(known)}")
        column = frame[key]
        if key in METRICS or key in ("parameters", "tokens_per_s", "train_s", "wall_s", "version"):
            try:
                number = float(value)
            except ValueError:
                raise fail(f"--where {key}{op}{value}: {value!r} is not a number ({key} is a number)") from None
            numbers = pd.to_numeric(column, errors="coerce")
            frame = frame[numbers.notna() & OPS[op](numbers, number)]
        elif op in ("=", "!="):
            text = column.fillna("").astype(str)
            if key in PREFIX_COLUMNS:
                hit = text.str.startswith(value) & (value != "")
            elif key == "task":  # "classifier" or "classification"
                keys = {k: k for k in TASKS} | {v: k for k, v in TASKS.items()}
                hit = text == keys.get(value, value)
            else:
                hit = text.str.lower() == value.lower() if key == "status" else text == value
            frame = frame[hit if op == "=" else ~hit]
        else:
            raise fail(f"--where {key}{op}{value}: {key} is text; compare it with = or !=")
    return frame


def _check_sort_name(sort: str, runs) -> None:
    """Refuse a --sort on a name outside the unit table or without a better direction."""
    found = metric(sort)
    if found is None or found.better is None:
        there = [m for m in _metric_names(runs) if metric(m) and metric(m).better] if not runs.empty else []
        names = ", ".join(sorted(set(there) | set(COMPARE_METRICS)))
        raise fail(f"--sort {sort}: not a metric with a better direction; try one of: {names}")


def _sort(frame, sort: str):
    """Best first in the unit table's direction; runs without the metric last. Refuses runs of tasks that do
    not log ``sort`` (their blanks would read as 'worst')."""
    found = metric(sort)
    tasks = set(frame["task"].dropna())
    if sort in PER_TASK_OBJECTIVE and len(tasks) > 1:
        raise fail(f"--sort {sort}: its unit depends on the task and these runs are of several; add --where task=…")
    others = sorted(TASKS[t] for t in tasks - set(found.tasks))
    if others:
        count = int(frame["task"].isin(tasks - set(found.tasks)).sum())
        raise fail(
            f"--sort {sort}: {count} of these {len(frame)} runs ({' and '.join(others)}) do not log it — it is "
            f"{describe(sort)}; narrow them with --where task={TASKS[found.tasks[0]]} or a pipeline name"
        )
    if sort not in frame:
        return frame
    return frame.sort_values(sort, ascending=found.better == "min", na_position="last", kind="stable")


def compare(
    pipeline: Annotated[str | None, typer.Argument(help="Only this pipeline's runs (default: all).")] = None,
    limit: Annotated[int, typer.Option(help="Most runs to show.")] = 20,
    sort: Annotated[
        str | None,
        typer.Option("--sort", metavar="METRIC", help="Best first by this metric (lower or higher: its unit)."),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            metavar="EXPR",
            help="Only runs with KEY OP VALUE (OP: = != < <= > >=), e.g. status=FINISHED, val_bpc<2.5, "
            "data=1a2b (a digest prefix), task=classifier; repeat to AND.",
        ),
    ] = None,
    format: Annotated[Literal["table", "csv", "json"], typer.Option("--format", help="Output format.")] = "table",
    samples: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--samples",
            metavar="A B",
            help="Instead: two registered versions (models:/NAME@ALIAS or models:/NAME/N) generating side by side "
            "from B's pipeline prompts, as the gate's generation card.",
        ),
    ] = None,
) -> None:
    """Runs side by side: status, task, data digest, architecture, size, each task's metrics in their own
    columns (one metric name, one unit), speed, wall time, registered version. Newest first unless --sort.
    With --samples A B: the two versions' generations side by side, with their statistics."""
    if samples:
        return _compare_samples(*samples)
    frame = compare_frame(pipeline, limit, where or [], sort)
    if format == "csv":
        typer.echo(frame.to_csv(index=False), nl=False)
        return
    if format == "json":
        typer.echo(frame.to_json(orient="records", date_format="iso"))
        return
    formats = {**{c: f for c, (_, f) in COMPARE_COLUMNS.items()}, **{c: f for c, (_, f) in TAIL_COLUMNS.items()}}
    table = Table(title=f"runs of {pipeline}" if pipeline else "recent runs", show_lines=False)
    shown = [c for c in frame.columns if frame[c].notna().any()] if len(frame) else list(frame.columns)
    for column in shown:
        table.add_column(column, justify="left" if column in ("pipeline", "run", "status", "task", "data") else "right")
    for _, row in frame.iterrows():
        table.add_row(*(_cell(row[c], formats.get(c, "{:.4f}")) for c in shown))
    out = _wide()
    out.print(table)
    for line in _footnotes(frame, [c for c in shown if c in METRICS]):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _footnotes(frame, metric_columns: list[str]) -> list[str]:
    """Each metric column's unit, direction and task; pipelines whose runs saw different data."""
    lines = [f"  {describe(m)}" for m in metric_columns]
    if len(frame) and frame["data"].notna().any():
        for name, runs in frame.groupby("pipeline"):
            digests = sorted(set(runs["data"].dropna()))
            if len(digests) > 1:
                lines.append(
                    f"  note: {name}'s runs are on {len(digests)} data digests ({', '.join(digests)}): "
                    "their metrics are comparable only within one digest"
                )
    return lines


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
    from flows.registry.verify import summary

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
            # the metric its gate compared (a summarizer's ROUGE-L, a QA model's exact match …), else a headline
            key = tags.get("lmp.gate.metric") or next((k for k in HEADLINE.values() if k in tags), "val_bpc")
            headline = f"{key} {tags.get(key, '?')}"
        aliases = {a: int(v) for a, v in sorted(found.aliases.items(), key=lambda kv: kv[0])}
        verified = {int(v.version): summary(v.tags) for v in versions if summary(v.tags)}  # `lmp verify`'s last word
        rows.append({"model": found.name, "versions": len(versions), "aliases": aliases, "champion_metric": headline,
                     "verified": dict(sorted(verified.items()))})  # fmt: skip
    if format == "json":
        typer.echo(json.dumps(rows))
        return
    table = Table(title="registered models")
    for column in ("model", "versions", "aliases", "champion metric", "verified"):
        table.add_column(column)
    for row in rows:
        aliases = ", ".join(f"@{a} → v{v}" for a, v in row["aliases"].items())
        verified = ", ".join(f"v{v} {said}" for v, said in row["verified"].items())
        table.add_row(row["model"], str(row["versions"]), aliases or "-", row["champion_metric"], verified)
    _wide().print(table)


def _registered_models(client, model: str | None) -> list:
    """Every registered model, or just ``model`` (an unknown name is a clear error)."""
    if model is not None:
        _require_model(client, model)
    return [m for m in _all_registered(client) if model in (None, m.name)]


def _all_registered(client) -> list:
    """Every registered model in the store (all pages)."""
    found, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _require_model(client, name: str) -> None:
    """Refuse a registered model name the store does not have, listing the ones it has (exit 2)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # an unreachable store is not "no such model"
            raise
    names = sorted(m.name for m in _all_registered(client))
    if not names:
        raise fail(f"no registered model {name!r}; {mlflow.get_tracking_uri()} has none yet (`lmp run` registers one)")
    shown = ", ".join(names[:30]) + (f" … ({len(names)} in all)" if len(names) > 30 else "")
    raise fail(f"no registered model {name!r}; the models are: {shown}")


HISTORY_COLUMNS = ("model", "version", "when", "event", "who", "challenger", "champion", "forced", "reason", "detail")


def _show_history(client, names: list[str], format: str) -> None:
    """The promotion history of each version of ``names``: per version, newest last."""
    from flows.registry import promotion

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
    """The gate of pipeline ``name`` in the config file, else the default gate of the version's task: its
    headline metric in the unit table's direction."""
    from flows.config import ConfigError, PromoteConfig, load_pipelines

    try:
        return load_pipelines(config).get(name)
    except (ConfigError, KeyError, OSError):
        task = next((t for t, m in HEADLINE.items() if m in version_tags), "causal")
        if version_tags.get("task") in ("classification", "seq2seq"):
            task = version_tags["task"]
        # a seq2seq version's headline is its application's (chrF, ROUGE-L or exact match): the first it logged
        metric = next((m for m in GATE_METRICS.get(task, ()) if m in version_tags), HEADLINE[task])
        return PromoteConfig(metric=metric, mode=METRICS[metric].better)


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
    from flows.config import ClassifierSpec, PipelineSpec, Seq2SeqSpec
    from flows.registry import promotion
    from flows.registry import register as registry

    client = _client()
    _require_model(client, model)
    target = (
        promotion.alias_version(client, model, "challenger")
        if version is None
        else _get_version(client, model, version)
    )
    if target is None:
        raise fail(f"registered model {model!r} has no @challenger; pass --version N")
    found = _promote_config(model, target.tags, config)
    spec = found if isinstance(found, PipelineSpec | ClassifierSpec | Seq2SeqSpec) else None
    gate = spec.promote if spec else found
    evaluate = None
    if spec is not None:  # the champion re-scored on the challenger's data, when it is still in the work directory
        from lm import tasks

        data = WORK_DIR / tasks.get(spec.task).data_root / target.tags.get("data_digest", "")[:16]
        if (data / "manifest.json").is_file():
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
    from flows.registry import promotion

    client = _client()
    _require_model(client, model)
    try:
        restored, demoted = promotion.rollback(client, model, reason=reason)
    except LookupError as e:
        raise fail(str(e)) from None
    except promotion.PromotionConflict as e:
        raise fail(str(e), code=1) from None
    console.print(f"{model}: @champion → v{restored} (v{demoted} demoted)")


def generate(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION (or runs:/…).")],
    prompt: Annotated[str, typer.Argument(help="Text to continue (seq2seq: to translate, summarise …).")],
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens to generate (1 to LMP_MAX_NEW_TOKENS_CAP, 4096; default 200, a seq2seq model's own)."
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 is greedy (default 0.8; a seq2seq model decodes as it was evaluated).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="0: no top-k filter (default 40).")] = None,
    top_p: Annotated[float | None, typer.Option(help="1.0: no nucleus filter.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[str | None, typer.Option(help="End at (and include) this string.")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (seq2seq models).")] = None,
    length_penalty: Annotated[float | None, typer.Option(help="Beam search: score / length ** this.")] = None,
) -> None:
    """Load a registered model (pickle-free pyfunc) and print its continuation of PROMPT, or a seq2seq model's
    output for it. Params left out take the model's defaults. The served model's limits apply
    (LMP_MAX_NEW_TOKENS_CAP, LMP_GENERATION_SECONDS, LMP_MAX_PROMPT_CHARS): a param out of range is refused
    (exit 2), and generation stops at the time budget with what it has."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    registered = MODEL_URI.match(model_uri)
    if registered:  # models:/NAME@ALIAS or models:/NAME/VERSION: an unknown NAME lists the models there are
        _require_model(client, registered["name"])
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise fail(f"cannot load {model_uri}: {str(e).splitlines()[0]}") from None
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "seed": seed, "stop": stop, "num_beams": num_beams, "length_penalty": length_penalty}  # fmt: skip
    params = {key: value for key, value in given.items() if value is not None}
    # A model that takes no generation params (a classifier, an encoder) answers the text alone: passing them
    # would only make MLflow warn that it ignores them.
    takes_params = loaded.metadata.get_params_schema() is not None
    try:
        output = loaded.predict([prompt], **({"params": params} if takes_params else {}))[0]
    except MlflowException as e:  # the model's own one-line check of the params and the prompt
        raise fail(e.message.splitlines()[0]) from None
    console.print(output if isinstance(output, str) else json.dumps(output), markup=False, highlight=False)
