"""What a finished run leaves for people: a loss-curve plot, a model card and the samples table —
in MLflow (run artifacts; the card is also the registered version's description) and as Prefect
artifacts on the flow run (markdown card, samples table)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import pandas as pd
from mlflow.tracking import MlflowClient

from flows.config import PipelineSpec
from flows.registry.promotion import verdict

HEADLINE = ("val_bpc", "val_loss", "val_perplexity", "val_accuracy", "test_bpc", "test_loss", "test_accuracy",
            "val_mlm_loss", "val_mlm_perplexity", "test_mlm_loss")  # fmt: skip


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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def card_parts(model: Mapping, metrics: Mapping, headline: tuple, registered: Mapping) -> tuple[str, str, str]:
    """What every model card shows: the architecture's shape, the headline metric rows, the gate's verdict."""
    shape = ", ".join(f"{k} {v}" for k, v in model.items() if k != "kind")
    rows = "\n".join(f"| {k} | {metrics[k]:.4f} |" for k in headline if k in metrics and math.isfinite(metrics[k]))
    gate = verdict(registered.get("decision"), registered["version"], created=registered.get("created", True))
    return shape, rows, gate


def model_card(
    spec: PipelineSpec, run_id: str, tokens: Mapping, trained: Mapping, evaluated: Mapping, registered: Mapping
) -> str:
    """A markdown model card: what the model is, what it was trained on, how good it is, what it writes."""
    model = spec.model.model_dump(mode="json")
    shape, rows, gate = card_parts(model, evaluated["metrics"], HEADLINE, registered)
    samples = "\n\n".join(
        f"**{s['prompt'].strip() or '(empty)'}**\n\n```\n{s['output']}\n```" for s in evaluated.get("samples", [])
    )
    if not samples:
        samples = f"```\n{evaluated['sample']}\n```"
    train_chars = tokens["chars"].get("train", 0)
    return f"""# {spec.name} — version {registered["version"]}

{spec.description or ""}

| | |
|---|---|
| registered model | `{registered["uri"]}` |
| MLflow run | `{run_id}` |
| architecture | {model["kind"]} ({shape}) |
| parameters | {trained["num_parameters"]:,} ({trained["num_parameters_non_embedding"]:,} non-embedding) |
| training FLOPs per token | {trained["flops_per_token"]:,.0f} |
| tokenizer | {spec.tokenizer.kind}, {tokens["vocab_size"]} ids, digest `{tokens["tokenizer_digest"][:12]}` |
| data | {spec.data.source}, digest `{tokens["data_digest"][:12]}`, {train_chars:,} training characters |
| training | {trained["steps"]} steps, {trained["wall_seconds"]:.0f} s, {trained["tokens_per_second"]:,.0f} tokens/s |
| promotion | {gate} |

## Metrics

Evaluation protocol: {evaluated["protocol"]}.

| metric | value |
|---|---|
{rows}

## Samples

{samples}
"""


def publish(
    spec: PipelineSpec, run_id: str, tokens: Mapping, trained: Mapping, evaluated: Mapping, registered: Mapping
) -> str:
    """Log the plot, card and samples to MLflow, set the card as the version's description, and create the
    Prefect artifacts. Returns the card."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    client = MlflowClient()
    card = model_card(spec, run_id, tokens, trained, evaluated, registered)
    client.log_text(run_id, card, "model_card.md")
    client.log_image(run_id, _png_image(loss_curve_png(client, run_id)), artifact_file="loss_curve.png")
    samples = evaluated.get("samples") or [{"prompt": "", "output": evaluated["sample"]}]
    client.log_table(run_id, data=pd.DataFrame(samples), artifact_file="samples.json")
    if registered.get("created", True):  # a reused version keeps the card of the run that created it
        client.update_model_version(spec.name, str(registered["version"]), description=card)
    key = spec.name.replace(".", "-").replace("_", "-")
    create_markdown_artifact(card, key=f"{key}-model-card", description=f"{spec.name} v{registered['version']}")
    create_table_artifact(samples, key=f"{key}-samples", description="generations from the fixed prompts")
    if registered.get("decision"):
        decision = registered["decision"]
        create_table_artifact(
            [{k: ("" if v is None else v) for k, v in decision.items()}],
            key=f"{key}-promotion",
            description="promotion gate decision",
        )
    return card


def _png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))
