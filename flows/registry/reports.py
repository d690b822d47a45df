"""What a finished run leaves for people, for every task alike: the evaluation's artifacts (sample text,
confusion matrices, tables), a loss-curve plot, and the one model card — the task's rows and sections
(``lm.report.Card``) between the rows every card has — in MLflow (run artifacts; the card is also the
registered version's description) and as Prefect artifacts on the flow run."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
from mlflow.tracking import MlflowClient

from flows.registry.promotion import verdict
from flows.registry.register import Registered
from lm.metrics import METRICS
from lm.report import Card
from lm.results import Evaluation, Trained


def loss_curve_png(client: MlflowClient, run_id: str) -> bytes:
    """Training loss and the periodic validation estimate against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss_estimate", "validation (estimate)")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            marker = "." if "val" in key else None
            ax.plot([m.step for m in history], [m.value for m in history], label=label, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def confusion_png(matrix: list[list[int]], labels: tuple[str, ...], title: str) -> bytes:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.0 * k + 2), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    return _png(fig)


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def log_evaluation(run_id: str, evaluation: Evaluation) -> None:
    """The evaluation's artifacts on its run: the summary text and protocol, each split's confusion matrix
    (JSON and PNG) and the task's tables. Its metrics are logged by the caller (once per step)."""
    client = MlflowClient()
    if evaluation.protocol:
        client.log_text(run_id, evaluation.summary, "samples/sample.txt")
        client.set_tag(run_id, "eval.protocol", evaluation.protocol)
    for split, matrix in evaluation.confusion.items():
        data = {"labels": list(evaluation.labels), "rows_true_columns_predicted": matrix}
        client.log_text(run_id, json.dumps(data, indent=1), f"evaluation/confusion_{split}.json")
        png = confusion_png(matrix, evaluation.labels, f"{split} confusion matrix")
        client.log_image(run_id, _png_image(png), artifact_file=f"evaluation/confusion_{split}.png")
    for artifact_file, rows in evaluation.tables.items():
        client.log_table(run_id, data=pd.DataFrame(list(rows)), artifact_file=artifact_file)


def metric_rows(metrics: dict[str, float], headline: tuple[str, ...]) -> str:
    """The card's headline metrics with their units from the one metric table (finite values only)."""
    return "\n".join(
        f"| {k} | {metrics[k]:.4f} | {METRICS[k].unit if k in METRICS else ''} |"
        for k in headline
        if k in metrics and math.isfinite(metrics[k])
    )


def model_card(spec, run_id: str, card: Card, trained: Trained, metrics: dict[str, float],
               registered: Registered) -> str:  # fmt: skip
    """The markdown model card: what the model is, what it was trained on, how good it is — the task's rows
    and sections between the rows every card has."""
    gate = verdict(registered.decision, registered.version, created=registered.created)
    training = f"{trained.steps} steps, {trained.wall_seconds:.0f} s, {trained.tokens_per_second:,.0f} tokens/s"
    rows = [("registered model", f"`{registered.uri}`"), ("MLflow run", f"`{run_id}`"), *card.rows,
            ("training", training), ("promotion", gate)]  # fmt: skip
    if registered.card:  # the gate met a champion: both models' generations side by side
        rows.append(("generation card", f"`{registered.card}` (and `.md`) on run `{run_id}`, beside the champion"))
    header = "\n".join(f"| {name} | {value} |" for name, value in rows)
    sections = "".join(f"\n## {title}\n\n{body}\n" for title, body in card.sections)
    return f"""# {spec.name} — version {registered.version}

{spec.description or ""}

| | |
|---|---|
{header}

## Metrics

{card.metrics_note}

| metric | value | unit |
|---|---|---|
{metric_rows(metrics, card.headline)}
{sections}"""


def publish(spec, run_id: str, card: Card, trained: Trained, evaluation: Evaluation, registered: Registered) -> str:
    """Log the plot, the card and the card's tables to MLflow, set the card as the version's description, and
    create the Prefect artifacts. Returns the card."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    client = MlflowClient()
    text = model_card(spec, run_id, card, trained, evaluation.metrics, registered)
    client.log_text(run_id, text, "model_card.md")
    client.log_image(run_id, _png_image(loss_curve_png(client, run_id)), artifact_file="loss_curve.png")
    if registered.created:  # a reused version keeps the card of the run that created it
        client.update_model_version(spec.name, str(registered.version), description=text)
    key = spec.name.replace(".", "-").replace("_", "-")
    create_markdown_artifact(text, key=f"{key}-model-card", description=f"{spec.name} v{registered.version}")
    for table in card.tables:
        if table.artifact_file:
            client.log_table(run_id, data=pd.DataFrame(table.rows), artifact_file=table.artifact_file)
        create_table_artifact(table.rows, key=f"{key}-{table.key}", description=table.description)
    if registered.decision:
        row = {k: ("" if v is None else v) for k, v in registered.decision.items()}
        create_table_artifact([row], key=f"{key}-promotion", description="promotion gate decision")
    return text
