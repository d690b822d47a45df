"""What a classification run leaves for people: confusion matrices, a per-class table, example predictions
and a model card naming the language model it was initialised from — in MLflow and as Prefect artifacts."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping

import pandas as pd
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from flows import tracking
from flows.registry.reports import _png_image, card_parts, loss_curve_png
from lm.metrics import METRICS

HEADLINE = (
    "val_macro_f1", "val_label_accuracy", "val_baseline_macro_f1", "val_baseline_label_accuracy",
    "val_loss_per_example", "val_macro_precision", "val_macro_recall", "test_macro_f1", "test_label_accuracy",
    "test_baseline_macro_f1",
)  # fmt: skip


def log_labelled_dataset(run_id: str, dataset: Mapping, source: str) -> None:
    """The run's dataset input (one row per split and class with its count), digest and source."""
    from mlflow.data.pandas_dataset import from_pandas

    counts = dataset["class_counts"]
    frame = pd.DataFrame(
        [{"split": s, "label": label, "examples": n} for s, per in counts.items() for label, n in per.items()]
    )
    with warnings.catch_warnings():  # schema inference warns that integer columns cannot hold missing values
        warnings.simplefilter("ignore", UserWarning)
        entity = from_pandas(frame, source=dataset["path"], name=source[:200], digest=dataset["digest"][:32])
        entity = entity._to_mlflow_entity()
    MlflowClient().log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])]
    )
    tracking.log_metrics(run_id, {f"data_examples_{s}": n for s, n in dataset["examples"].items()})


def confusion_png(matrix: list[list[int]], labels: list[str], title: str) -> bytes:
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def per_class(metrics: Mapping[str, float], labels: list[str], split: str = "val") -> list[dict]:
    return [
        {
            "label": name,
            "precision": round(metrics[f"{split}_precision_{name}"], 4),
            "recall": round(metrics[f"{split}_recall_{name}"], 4),
            "f1": round(metrics[f"{split}_f1_{name}"], 4),
        }
        for name in labels
    ]


def log_evaluation(run_id: str, result: Mapping) -> None:
    """Confusion matrices (JSON and PNG) and the per-class table of each evaluated split."""
    client = MlflowClient()
    for split, matrix in result["confusion"].items():
        data = {"labels": result["labels"], "rows_true_columns_predicted": matrix}
        client.log_text(run_id, json.dumps(data, indent=1), f"evaluation/confusion_{split}.json")
        png = confusion_png(matrix, result["labels"], f"{split} confusion matrix")
        client.log_image(run_id, _png_image(png), artifact_file=f"evaluation/confusion_{split}.png")
        table = pd.DataFrame(per_class(result["metrics"], result["labels"], split))
        client.log_table(run_id, data=table, artifact_file=f"evaluation/per_class_{split}.json")
    client.log_table(run_id, data=pd.DataFrame(result["samples"]), artifact_file="predictions.json")


def predictions_text(samples: list[dict]) -> str:
    """Example predictions, one per line, for the terminal."""
    lines = []
    for s in samples:
        text = " / ".join(s["text"].strip().splitlines())
        mark = "✓" if s["predicted"] == s["label"] else "✗"
        lines.append(f"{mark} {s['predicted']} ({s['p']:.2f}), true {s['label']}: {text[:90]}")
    return "\n".join(lines)


def metric_rows(metrics: Mapping[str, float]) -> str:
    """The card's headline metrics with their units from the one metric table (finite values only)."""
    return "\n".join(
        f"| {k} | {metrics[k]:.4f} | {METRICS[k].unit} |"
        for k in HEADLINE
        if k in metrics and math.isfinite(metrics[k])
    )


def model_card(spec, run_id: str, encoded: Mapping, trained: Mapping, evaluated: Mapping, registered: Mapping,
               init: Mapping | None) -> str:  # fmt: skip
    model, metrics = encoded["model"], evaluated["metrics"]
    shape, _, gate = card_parts(model, metrics, HEADLINE, registered)
    rows = metric_rows(metrics)
    classes = "\n".join(
        f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |"
        for r in per_class(metrics, evaluated["labels"])
    )
    lineage = (
        f"initialised from `{init['uri']}` (asked for `{init['requested']}`, run `{init['run_id']}`)"
        if init
        else "trained from scratch (no pretrained weights)"
    )
    head = spec.head
    return f"""# {spec.name} — version {registered["version"]}

{spec.description or ""}

| | |
|---|---|
| registered model | `{registered["uri"]}` |
| MLflow run | `{run_id}` |
| lineage | {lineage} |
| backbone | {model["kind"]} ({shape}) |
| head | {head.pooling} pooling, dropout {head.dropout}, {head.freeze_layers} frozen layers, class weights {head.class_weights} |
| parameters | {trained["num_parameters"]:,} ({trained["trainable_parameters"]:,} trained) |
| tokenizer | {encoded["tokenizer_source"]}, {encoded["vocab_size"]} ids, digest `{encoded["tokenizer_digest"][:12]}` |
| data | {spec.data.source}, digest `{encoded["data_digest"][:12]}`, examples {encoded["examples"]} |
| classes | {", ".join(evaluated["labels"])} |
| training | {trained["steps"]} steps, {trained["wall_seconds"]:.0f} s, {trained["tokens_per_second"]:,.0f} tokens/s |
| promotion | {gate} |

## Metrics

Baseline: always the most frequent training class, on the same split.

| metric | value | unit |
|---|---|---|
{rows}

## Per class (validation)

| class | precision | recall | F1 |
|---|---|---|---|
{classes}

## Example predictions

```
{predictions_text(evaluated["samples"])}
```
"""  # noqa: E501


def publish(spec, run_id: str, encoded: Mapping, trained: Mapping, evaluated: Mapping, registered: Mapping,
            init: Mapping | None) -> str:  # fmt: skip
    """Log the loss curve and card, set the card as the version's description, create Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    client = MlflowClient()
    card = model_card(spec, run_id, encoded, trained, evaluated, registered, init)
    client.log_text(run_id, card, "model_card.md")
    client.log_image(run_id, _png_image(loss_curve_png(client, run_id)), artifact_file="loss_curve.png")
    if registered.get("created", True):
        client.update_model_version(spec.name, str(registered["version"]), description=card)
    key = spec.name.replace(".", "-").replace("_", "-")
    create_markdown_artifact(card, key=f"{key}-model-card", description=f"{spec.name} v{registered['version']}")
    create_table_artifact(per_class(evaluated["metrics"], evaluated["labels"]), key=f"{key}-per-class")
    if registered.get("decision"):
        decision = registered["decision"]
        create_table_artifact(
            [{k: ("" if v is None else v) for k, v in decision.items()}],
            key=f"{key}-promotion",
            description="promotion gate decision",
        )
    return card
