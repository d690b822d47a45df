"""Typed results passed between stages, Prefect tasks and processes (frozen pydantic; JSON where they leave
the process — ``trained.json``, a torchrun job — never pickle). A task returns its own kinds of each:
a language model prepares a ``Corpus`` and encodes ``TokenShards``; a classifier a ``LabelledDataset`` and
``EncodedExamples``. The flow reads only the fields every kind shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Prepared(Result):
    """The ingest stage's result: a content-addressed data directory."""

    path: str
    digest: str
    cached: bool
    key: str
    inputs: dict
    """What the directory depends on (its cache key is their digest; `lmp plan` diffs them)."""
    skipped: list[str] = []
    replaced_chars: int = 0

    def sizes(self) -> dict:
        """What the stage's log line shows."""
        raise NotImplementedError


class Corpus(Prepared):
    """Cleaned text split into ``train``/``val``/``test`` files."""

    documents: int
    chars: dict[str, int]
    counts: dict[str, int] = {}
    """What cleaning did (a fresh build only)."""

    def sizes(self) -> dict:
        return {"documents": self.documents, "chars": self.chars}


class LabelledDataset(Prepared):
    """Labelled examples split into ``<split>.jsonl`` files (what the source adds to the manifest — the plays of
    a genre split, a hub dataset's files — is kept as extra fields)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    labels: list[str]
    examples: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    source: str = ""

    def sizes(self) -> dict:
        return self.examples


class PairDataset(Prepared):
    """(source, target) text pairs split into ``<split>.jsonl`` files, each row ``{"source": …, "target": …}``
    (what the source adds to the manifest — the items of each split, a hub dataset's files — is kept as extra
    fields)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    application: str
    """``translation``, ``summarization`` or ``question-answering``: which metrics and baselines apply."""
    pairs: dict[str, int]
    """Pairs per split."""
    dropped: dict[str, int] = {}
    """Pairs dropped per split because the source or the target was empty after cleaning."""
    duplicates: dict[str, int] = {}
    """Validation/test pairs whose source also occurs in training (``"val"``, ``"test"``): reported, kept."""
    source: str = ""

    def sizes(self) -> dict:
        return self.pairs


class Encoded(Result):
    """The tokenize stage's result: a tokenizer and the data as ids, content-addressed."""

    path: str
    key: str
    cached: bool
    inputs: dict
    data_digest: str
    tokenizer_digest: str
    vocab_size: int

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.path) / "tokenizer.json"

    def sizes(self) -> dict:
        raise NotImplementedError


class TokenShards(Encoded):
    """Each split as one flat token file (``<split>.bin``, ``dtype``)."""

    tokenizer: str
    dtype: str
    tokens: dict[str, int]
    chars: dict[str, int]
    bytes: dict[str, int]
    oov_rate: dict[str, float] = {}
    """Per split, the fraction of tokens that are ``<unk>`` (a word tokenizer's out-of-vocabulary rate); empty
    for other tokenizers."""
    shards: dict[str, list[dict]] = {}
    """Per split, its shards in order: ``{"tokens", "sha256"}`` (what ``lmp plan --verify`` re-hashes)."""
    train_sample: dict | None = None
    """What the tokenizer was trained on: ``bytes`` of the training split's ``of_bytes`` in ``windows``."""

    def sizes(self) -> dict:
        return self.tokens


class EncodedExamples(Encoded):
    """Each split's examples as padded ids + lengths + labels (``<split>.safetensors``)."""

    dataset_path: str
    tokenizer_source: str
    labels: list[str]
    class_counts: dict[str, dict[str, int]]
    examples: dict[str, int]
    max_tokens: int

    def sizes(self) -> dict:
        return self.examples


class EncodedPairs(Encoded):
    """Each split's pairs as padded source and target ids with their lengths (``<split>.safetensors``)."""

    dataset_path: str
    tokenizer_source: str
    application: str
    pairs: dict[str, int]
    truncated: dict[str, dict[str, int]]
    """Pairs per split whose ``source`` / ``target`` lost tokens to the length limits."""
    unknown: dict[str, float] = {}
    """Per split, the fraction of target characters the tokenizer cannot write (a char tokenizer's unknown id)."""
    lengths: dict[str, int | None]
    """``max_source``, ``max_target`` and ``total`` (a decoder's context, None for an encoder–decoder)."""
    target_lang: str | None = None

    def sizes(self) -> dict:
        return self.pairs


class Init(Result):
    """The registered model a pipeline starts from, downloaded."""

    requested: str
    uri: str
    name: str
    version: int
    run_id: str | None
    weights_digest: str
    package: Package
    model: dict
    """The package's architecture (config.json's ``model``)."""
    vocab_size: int
    parts: dict[str, Init] = {}
    """Further models started from, by role (an encoder–decoder's ``encoder``)."""


class Package(Result):
    """The files a served model needs: weights, config.json, tokenizer.json."""

    weights: str
    config: str
    tokenizer: str

    def artifacts(self) -> dict[str, str]:
        """The files by the names MLflow logs them under (the pyfunc's ``context.artifacts``)."""
        return {"weights": self.weights, "config": self.config, "tokenizer": self.tokenizer}


class Served(Result):
    """How the registry logs a model: an example input and output (the signature) and its request params."""

    example_input: str
    example_output: Any
    params: dict | None = None


class Trained(Result):
    """What training produced: the final weights and the run's summary numbers, with the model's card."""

    checkpoint: str
    steps: int
    train_loss: float
    wall_seconds: float
    tokens_per_second: float
    best_step: int | None = None
    stopped_early: bool = False
    card: dict[str, float | int | str] = {}
    """Sizes logged as parameters: parameter counts, FLOPs per token, objective, feature width …"""

    @model_validator(mode="before")
    @classmethod
    def _flat_card(cls, value):
        """A record written before results were typed (``trained.json``) had the card's keys at the top."""
        if isinstance(value, dict) and "card" not in value:
            known = set(cls.model_fields)
            value = {k: v for k, v in value.items() if k in known} | {
                "card": {k: v for k, v in value.items() if k not in known}
            }
        return value


class Evaluation(Result):
    """Metrics on the held-out splits, the text the run summary shows and the rows of its samples table."""

    metrics: dict[str, float]
    summary: str
    """The sample shown in `lmp run`'s summary (a generation, a fill-in, the predictions)."""
    samples: list[dict] = []
    protocol: str = ""
    confusion: dict[str, list[list[int]]] = {}
    """A classifier's confusion matrix per split (rows: true class, columns: predicted), over ``labels``."""
    labels: list[str] = []
    tables: dict[str, list[dict]] = {}
    """Tables logged with the evaluation, by artifact file (a classifier's per-class scores and predictions)."""


Init.model_rebuild()
