"""flows/registry/reports.py: one model card for every task — the task's rows and sections between the rows
every card has."""

from __future__ import annotations

from types import SimpleNamespace

from flows.registry.register import Registered
from flows.registry.reports import model_card
from lm.metrics import METRICS
from lm.report import Card
from lm.results import Trained

TRAINED = Trained(checkpoint="/w/final", steps=30, train_loss=2.0, wall_seconds=4.2, tokens_per_second=1234.0)
REGISTERED = Registered(name="smoke", version=3, uri="models:/smoke/3", model_uri="models:/m-1", decision=None)
SPEC = SimpleNamespace(name="smoke", description="a tiny model")


def test_a_card_puts_the_tasks_rows_between_the_common_ones_and_gives_units():
    card = Card(
        rows=[("architecture", "gpt (num_layers 1)"), ("data", "builtin")],
        headline=("val_bpc", "val_macro_f1", "val_loss", "not_a_metric"),
        metrics_note="Evaluation protocol: whole split.",
        sections=[("Samples", "```\nROMEO:\n```")],
    )
    metrics = {"val_bpc": 2.3456789, "val_loss": float("nan"), "not_a_metric": 1.0}
    text = model_card(SPEC, "run-1", card, TRAINED, metrics, REGISTERED)
    header = text.split("|---|---|\n")[1].split("\n\n")[0].splitlines()
    names = [line.split(" | ")[0].removeprefix("| ") for line in header]
    assert names == ["registered model", "MLflow run", "architecture", "data", "training", "promotion"]
    assert f"| val_bpc | 2.3457 | {METRICS['val_bpc'].unit} |" in text
    assert "val_loss" not in text.split("## Metrics")[1].split("## Samples")[0]  # NaN rows are left out
    assert "| not_a_metric | 1.0000 |  |" in text  # a name without a unit in the table still shows
    assert text.startswith("# smoke — version 3\n\na tiny model") and "## Samples\n\n```\nROMEO:\n```" in text
    assert "30 steps, 4 s, 1,234 tokens/s" in text
