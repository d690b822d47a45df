"""What a task says about a run for people, as data: the rows of its model card, the dataset it read, the tables
it leaves. ``flows/registry/reports.py`` turns them into the one model card (markdown, MLflow, Prefect) and
``flows/tracking.py`` logs the dataset, for every task alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """Rows logged as an MLflow table artifact (``artifact_file``) and a Prefect table artifact (``key``)."""

    key: str
    rows: list[dict]
    description: str
    artifact_file: str | None = None


@dataclass(frozen=True)
class Card:
    """A task's part of the model card: header rows after the model URI and run, the headline metrics, the note
    above the metrics table, and sections after it (title, markdown); plus the tables the run leaves."""

    rows: list[tuple[str, str]]
    headline: tuple[str, ...]
    metrics_note: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetRecord:
    """The run's dataset input in MLflow: one row per item of ``rows``, named by source and digest, with counts
    logged as metrics."""

    rows: list[dict]
    source: str
    path: str
    digest: str
    counts: dict[str, float]


def shape(model: dict) -> str:
    """An architecture's sizes in one line for a card (``num_layers 4, embed_dim 128 …``)."""
    return ", ".join(f"{k} {v}" for k, v in model.items() if k != "kind")


def code_block(text: str) -> str:
    return f"```\n{text}\n```"
