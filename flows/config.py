"""The pipelines.yaml schema and ``load_pipelines`` — the one place YAML is read.

An invalid file raises one ``ConfigError`` listing every problem by its YAML path, e.g.
``pipelines.smoke.model.num_layers: Input should be greater than 0``. YAML is read with ``yaml.safe_load``
semantics through a bounded loader: alias count, values after alias expansion and nesting depth are capped
before anything is built, so a few hundred bytes of nested anchors cannot expand into gigabytes.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from lm.classification.config import HeadConfig, LabelledData
from lm.config import (
    BuiltinData,
    DataConfig,
    DataWorkers,
    EvalConfig,
    Frozen,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
)
from lm.metrics import APPLICATION_HEADLINE
from lm.metrics import GATE_METRICS as METRICS
from lm.seq2seq.config import DecodeConfig, LengthConfig
from lm.seq2seq.sources import PairData

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_FILE_BYTES = 1 << 20
# Far above any real pipelines file (the shipped one: 21 aliases, 805 values, 7 levels), far below harm.
MAX_ALIASES = 1_000
MAX_VALUES = 100_000
MAX_DEPTH = 50


class ConfigError(ValueError):
    """pipelines.yaml is unreadable or invalid; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        listing = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)  # a YAML caret keeps its column
        super().__init__(f"{source}: {len(problems)} problem(s):\n{listing}")


TASKS = ("language-model", "classification", "seq2seq")
INIT_URI = re.compile(r"^models:/(?P<name>[a-z0-9][a-z0-9._-]{0,62})(@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
HF_INIT = "hf:"
"""``init_from: hf:PATH``: a Transformers folder on this machine (GPT-2 or GPT-NeoX layout, safetensors)."""


def check_init_source(key: str, uri: str) -> None:
    """``uri`` names a registered model or a local Transformers folder, else ValueError naming ``key``."""
    if INIT_URI.match(uri) or (uri.startswith(HF_INIT) and uri[len(HF_INIT) :].strip()):
        return
    scratch = "`scratch`, " if key == "init_from" else ""
    raise ValueError(
        f"{key} {uri!r} is not {scratch}`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `hf:PATH` (a Transformers "
        "folder)"
    )


class PromoteConfig(Frozen):
    """The gate a new version must pass to become @champion (compared on the same evaluation data)."""

    metric: str = "val_bpc"
    """Metric compared; an encoder pipeline defaults to `val_mlm_loss`."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (`min`) or higher (`max`) is better."""
    min_improvement: float = Field(default=0.0, ge=0.0)
    """How much better than the champion the challenger must be (in the metric's units)."""
    require_finite: bool = True
    """A NaN/inf challenger metric never promotes."""
    auto: bool = True
    """Run the gate after every registration (otherwise only `lmp promote` moves @champion)."""
    max_repetition_increase: float | None = Field(default=None, ge=0.0)
    """Generation card rule (language and seq2seq models): refuse a challenger whose mean repetition rate (share of
    repeated 4-grams of tokens, 0–1) exceeds the champion's by more than this. None: off."""


Scalar = str | int | float | bool | None
Override = Scalar | list[Scalar]


def _plain(value: object, section: str, *, lists: bool) -> object:
    """Override values are plain values (not nested mappings or lists): one clear error naming the key."""
    if isinstance(value, dict):
        for key, v in value.items():
            items = v if lists and isinstance(v, list) else [v]
            nested = next((item for item in items if isinstance(item, dict | list)), None)
            if nested is not None:
                what = "a mapping" if isinstance(nested, dict) else "a nested list"
                also = " or a list of those" if lists else ""
                raise ValueError(
                    f"{section}.parameters {key!r}: {what} is not a plain value (a string, number, boolean or "
                    f"null{also}); set each leaf by its dotted key, e.g. 'train.max_steps'"
                )
    return value


CRON_FIELD = re.compile(r"^[\w*/,\-?LW#]+$")


class ScheduleConfig(Frozen):
    """When `lmp schedule` runs the pipeline: a cron expression or an interval, in a time zone."""

    cron: str | None = None
    """Five-field cron expression, e.g. "0 3 * * *" (03:00 every night)."""
    interval: float | None = Field(default=None, gt=0)
    """Seconds between runs (instead of `cron`)."""
    timezone: str = "UTC"
    """IANA time zone the cron expression is read in."""
    parameters: dict[str, Override] = {}
    """Config overrides for scheduled runs, by dotted key, e.g. {"train.max_steps": 300}: plain values
    (a string, number, boolean or null, or a list of those)."""
    active: bool = True
    """False keeps the deployment but pauses its schedule."""

    @field_validator("parameters", mode="before")
    @classmethod
    def _plain_values(cls, value: object) -> object:
        return _plain(value, "schedule", lists=True)

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("a schedule needs exactly one of `cron` or `interval`")
        if self.cron is not None:
            fields = self.cron.split()
            if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
                raise ValueError(f"cron {self.cron!r} is not a five-field cron expression like '0 3 * * *'")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone such as 'Europe/Paris'") from None
        return self


SWEEPABLE = ("model", "train", "eval", "head")  # not data/tokenizer: every trial reuses one ingest and tokenize


class SweepConfig(Frozen):
    """A hyperparameter search for `lmp sweep`: trials fan out over a Dask cluster (a local one by default)."""

    method: Literal["grid", "random"] = "grid"
    """`grid`: every combination of the values; `random`: `trials` seeded draws, one value per key."""
    parameters: dict[str, list[Scalar]] = Field(min_length=1)
    """Dotted config keys and their candidate values, e.g. {"train.learning_rate": [0.001, 0.003]}."""
    trials: int | None = Field(default=None, gt=0)
    """Random search: how many trials (required there; a grid has one per combination)."""
    seed: int = 0
    max_parallel: int = Field(default=2, gt=0)
    """Trials running at once (Dask workers of the local cluster, one process each)."""
    scheduler_address: str | None = None
    """An existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (its workers need this project installed)."""
    metric: str | None = None
    """What ranks the trials (default: `promote.metric`, in `promote.mode`)."""

    @field_validator("parameters", mode="before")
    @classmethod
    def _plain_values(cls, value: object) -> object:
        if isinstance(value, dict):
            for key, candidates in value.items():
                if isinstance(candidates, list):
                    _plain({f"{key}[{i}]": c for i, c in enumerate(candidates)}, "sweep", lists=False)
        return value

    @model_validator(mode="after")
    def _well_formed(self) -> SweepConfig:
        bad = [k for k in self.parameters if k.split(".")[0] not in SWEEPABLE or "." not in k]
        if bad:
            raise ValueError(f"sweep.parameters {bad}: only {', '.join(s + '.*' for s in SWEEPABLE)} keys can vary")
        empty = [k for k, v in self.parameters.items() if not v]
        if empty:
            raise ValueError(f"sweep.parameters {empty} have no values")
        if (self.method == "random") != (self.trials is not None):
            raise ValueError("sweep.trials is required for method: random and not used by method: grid")
        return self


class _Spec(Frozen):
    """What every pipeline has, whatever its task: a name, training, operations and the promotion gate."""

    name: str
    """Registered-model name and MLflow experiment name; filled in from the YAML key."""
    description: str = ""
    train: TrainConfig = TrainConfig()
    retries: int = Field(default=0, ge=0)
    """Prefect retries of each task after an unexpected (transient) error — never after bad input; a
    retried train task resumes from the newest checkpoint."""
    retry_delay_seconds: float = Field(default=10.0, ge=0.0)
    """Wait before each retry."""
    promote: PromoteConfig = PromoteConfig()
    """The promotion gate for this pipeline's registered model."""
    schedule: ScheduleConfig | None = None
    """Run on a schedule under `lmp schedule` (a Prefect deployment)."""
    timeout_seconds: float | None = Field(default=None, gt=0)
    """Fail the train task if it runs longer than this (None: no limit)."""
    training_slots: int = Field(default=1, gt=0)
    """Training tasks allowed at once on this machine, across processes sharing the work directory;
    others wait for a slot (a killed task's slot frees itself)."""
    sweep: SweepConfig | None = None
    """A hyperparameter search `lmp sweep` runs (each trial a child run; the best is registered)."""
    export: tuple[Literal["hf", "onnx"], ...] = ()
    """Formats each newly registered version is exported to (as `lmp export` does), logged as artifacts
    `export/<format>` of its run: `hf` (a Transformers folder; GPT only) and `onnx` (every architecture)."""

    def scheduled(self):
        """This spec with the schedule's parameter overrides applied (validated)."""
        if self.schedule is None or not self.schedule.parameters:
            return self
        return self.overridden(self.schedule.parameters, clear="schedule")

    def overridden(self, values: dict[str, Any], clear: str | None = None):
        """This spec with ``values`` applied and validated (pydantic's ValidationError if the result is invalid;
        this spec is unchanged). Keys are dotted paths (``"train.max_steps"``) or top-level fields (``"retries"``);
        values are JSON-like (scalars, lists, dicts), and a dict replaces the whole section or field it names
        (``{"head": {"pooling": "mean"}}``: unnamed fields take their defaults). A dotted key into an unset
        section (None) starts it empty. ``clear``: the section whose overrides these are, emptied so they are
        not applied twice."""
        data = self.model_dump(mode="json")
        if clear == "schedule":
            data["schedule"]["parameters"] = {}
        elif clear == "sweep":
            data["sweep"] = None
        for dotted, value in values.items():
            *path, leaf = dotted.split(".")
            target = data
            for key in path:
                if not isinstance(target.get(key), dict):
                    target[key] = {}
                target = target[key]
            target[leaf] = value
        return type(self).model_validate(data)

    def trials(self) -> list[tuple[dict[str, Any], _Spec]]:
        """The sweep's trials: (the values it tries, the spec with them applied)."""
        import itertools
        import random

        cfg = self.sweep
        keys = list(cfg.parameters)
        if cfg.method == "grid":
            combos = list(itertools.product(*(cfg.parameters[k] for k in keys)))
        else:
            rng = random.Random(cfg.seed)
            combos = [tuple(rng.choice(cfg.parameters[k]) for k in keys) for _ in range(cfg.trials)]
        return [(dict(zip(keys, combo, strict=True)), self.overridden(dict(zip(keys, combo, strict=True)), "sweep"))
                for combo in combos]  # fmt: skip

    @model_validator(mode="after")
    def _sweep_trials_are_valid(self):
        if self.sweep is not None:
            try:
                self.trials()
            except ValidationError as e:
                where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"sweep.parameters make an invalid pipeline: {where}") from None
        return self

    @model_validator(mode="after")
    def _schedule_overrides_are_valid(self):
        if self.schedule is not None and self.schedule.parameters:
            try:
                self.scheduled()
            except ValidationError as e:
                where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"schedule.parameters make an invalid pipeline: {where}") from None
        return self

    def _check_export(self, refused: dict[str, str]) -> None:
        """``export:`` names no format this pipeline's models cannot be written in (``refused``: format → why)."""
        for fmt in self.export:
            if fmt in refused:
                raise ValueError(f"export: {fmt} — {refused[fmt]}")

    def _check_promote_metric(self, objective: str, kind: str) -> None:
        if self.promote.metric not in METRICS[objective]:
            raise ValueError(
                f"promote.metric {self.promote.metric!r} is not reported for {kind} models; "
                f"use one of {', '.join(METRICS[objective])}"
            )


def shape(model: ModelConfig) -> str:
    """An architecture in a few words: ``gpt 4×128, ctx 256``."""
    width = getattr(model, "hidden_dim", getattr(model, "embed_dim", "?"))
    return f"{model.kind} {model.num_layers}×{width}, ctx {model.context_length}"


def _default_kind(value: dict, section: str, key: str, default: str) -> None:
    if isinstance(value.get(section), dict) and key not in value[section]:
        value[section] = {key: default, **value[section]}


def _initialised_defaults(value: dict, gate: str) -> dict:
    """A pipeline that may start from a registered model: from scratch, `tokenizer.kind` char and `model.kind`
    gpt by default; the gate compares ``gate``, higher is better, unless `promote:` says otherwise."""
    value = dict(value)
    if value.get("init_from", "scratch") == "scratch" and value.get("tokenizer") is None:
        value["tokenizer"] = {"kind": "char"}
    _default_kind(value, "model", "kind", "gpt")
    _default_kind(value, "tokenizer", "kind", "char")
    promote = value.get("promote", {})
    if isinstance(promote, dict):
        value["promote"] = {"metric": gate, "mode": "max", **promote}
    return value


class PipelineSpec(_Spec):
    """A language-model pipeline: data → tokenizer → model → training → evaluation → registry."""

    task: Literal["language-model"] = "language-model"
    init_from: str = "scratch"
    """`scratch`: a fresh model described by `model` and `tokenizer`; or further pretraining of
    `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `hf:PATH` (a Transformers folder on this machine), whose
    architecture, weights and tokenizer the run starts from."""
    data: DataConfig = Field(default_factory=BuiltinData)
    tokenizer: TokenizerConfig | None = None
    """Scratch only (default: char); an initialised model brings its own."""
    model: ModelConfig | None = None
    """Scratch only (default: gpt); an initialised model brings its own architecture."""
    eval: EvalConfig = EvalConfig()
    data_workers: DataWorkers = DataWorkers()
    """How tokenization spreads over local processes or a Dask cluster (same tokens either way)."""

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, value: object) -> object:
        """From scratch `model.kind` defaults to gpt, `tokenizer.kind` to char; `data.source` to builtin."""
        if isinstance(value, dict):
            value = dict(value)
            if value.get("init_from", "scratch") == "scratch":
                value.setdefault("model", {})
                value.setdefault("tokenizer", {})
            _default_kind(value, "model", "kind", "gpt")
            _default_kind(value, "tokenizer", "kind", "char")
            _default_kind(value, "data", "source", "builtin")
            model, promote = value.get("model"), value.get("promote", {})
            if isinstance(model, dict) and model.get("kind") == "encoder" and isinstance(promote, dict):
                value["promote"] = {"metric": "val_mlm_loss", **promote}
        return value

    @property
    def scratch(self) -> bool:
        return self.init_from == "scratch"

    def model_summary(self) -> str:
        """The model in a few words, for `lmp list`."""
        return shape(self.model) if self.scratch else f"further pretraining of {self.init_from}"

    @model_validator(mode="after")
    def _promote_metric_is_reported(self) -> PipelineSpec:
        if not self.scratch:
            check_init_source("init_from", self.init_from)
            if self.model is not None or self.tokenizer is not None:
                raise ValueError(
                    f"the architecture and tokenizer come from {self.init_from}; remove `model:` and `tokenizer:`"
                )
            return self  # the objective is the initialising model's, known once a run resolves it
        self._check_promote_metric("mlm" if self.model.kind == "encoder" else "causal", self.model.kind)
        return self

    @model_validator(mode="after")
    def _fits(self) -> PipelineSpec:
        if self.model is not None and self.model.kind != "gpt":
            self._check_export({"hf": f"Transformers has no exact counterpart of our {self.model.kind}; use onnx"})
        if self.model is not None and self.train.eval_tokens < self.model.context_length:
            raise ValueError(
                f"train.eval_tokens ({self.train.eval_tokens}) must be at least "
                f"model.context_length ({self.model.context_length})"
            )
        return self


class ClassifierSpec(_Spec):
    """A classification pipeline: labelled data → the initialising model's tokenizer (or a new one) →
    backbone + head → training → accuracy / macro-F1 → registry. The gate compares macro-F1."""

    task: Literal["classification"]
    init_from: str = "scratch"
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` (a registered language model: its architecture,
    weights and tokenizer), `hf:PATH` (a Transformers folder on this machine), or `scratch` (a fresh backbone
    described by `model` and `tokenizer`)."""
    data: LabelledData
    tokenizer: TokenizerConfig | None = None
    """Scratch only (default: char); an initialised classifier uses its model's tokenizer."""
    model: ModelConfig | None = None
    """Scratch only, required there; an initialised classifier has its model's architecture."""
    head: HeadConfig = HeadConfig()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: object) -> object:
        """Scratch: `model.kind` gpt, `tokenizer.kind` char; the gate defaults to macro-F1, higher is better."""
        return _initialised_defaults(value, "val_macro_f1") if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> ClassifierSpec:
        if self.init_from != "scratch":
            check_init_source("init_from", self.init_from)
        if self.init_from == "scratch":
            if self.model is None:
                raise ValueError("init_from: scratch needs a `model:` section (the backbone to build)")
            if self.head.pooling == "cls" and self.model.kind != "encoder":
                raise ValueError(
                    f"head.pooling 'cls' needs a bidirectional encoder, not {self.model.kind}; use last or mean"
                )
        elif self.model is not None or self.tokenizer is not None:
            raise ValueError(
                f"the architecture and tokenizer come from {self.init_from}; remove `model:` and `tokenizer:`"
            )
        self._check_export({"hf": "a classifier has no Transformers export here; use onnx"})
        self._check_promote_metric("classification", "classification")
        return self

    @property
    def scratch(self) -> bool:
        return self.init_from == "scratch"

    def model_summary(self) -> str:
        return f"classifier on {shape(self.model) if self.scratch else self.init_from}"


class Seq2SeqSpec(_Spec):
    """A sequence-to-sequence pipeline (translation, summarization, question answering): (source, target) pairs →
    the initialising model's tokenizer (or a new one) → a decoder read as a prefix LM, or an encoder–decoder
    warm-started from a registered encoder and GPT → loss on targets, chrF/BLEU, ROUGE or exact match/F1 beside
    the application's baseline → registry. The gate compares the application's headline metric."""

    task: Literal["seq2seq"]
    architecture: Literal["decoder", "encoder-decoder"] = "decoder"
    """`decoder`: a causal LM (GPT or LSTM) reads `source <sep> target <eos>`, its loss on the target only;
    `encoder-decoder`: a bidirectional encoder reads the source and a GPT decoder attends to it (cross-attention)."""
    init_from: str = "scratch"
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`: the registered language model the decoder starts from
    (weights and tokenizer), `hf:PATH` (a Transformers folder on this machine), or `scratch` (a fresh model
    described by `model` and `tokenizer`)."""
    encoder_from: str | None = None
    """encoder-decoder from registered models: the registered masked-LM encoder (same tokenizer as init_from)."""
    data: PairData
    tokenizer: TokenizerConfig | None = None
    """Scratch only (default: char, learnt on the training pairs); an initialised model brings its own."""
    model: ModelConfig | None = None
    """Scratch only, required there: the decoder (gpt or lstm; an encoder-decoder's encoder has its shape)."""
    lengths: LengthConfig = LengthConfig()
    decode: DecodeConfig = DecodeConfig()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: object) -> object:
        """Scratch: `model.kind` gpt, `tokenizer.kind` char; the gate: the application's headline, higher better."""
        if not isinstance(value, dict):
            return value
        data = value.get("data")
        return _initialised_defaults(value, APPLICATION_HEADLINE[_application(data) if isinstance(data, dict) else
                                                                 "translation"])  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> Seq2SeqSpec:
        encdec = self.architecture == "encoder-decoder"
        if self.scratch:
            if self.model is None:
                raise ValueError("init_from: scratch needs a `model:` section (the decoder to build)")
            if self.model.kind == "encoder":
                raise ValueError("model.kind encoder cannot generate: use gpt or lstm (an encoder-decoder's "
                                 "encoder takes the decoder's shape)")  # fmt: skip
            if encdec and self.model.kind != "gpt":
                raise ValueError(f"an encoder-decoder's decoder is a gpt, not {self.model.kind}")
            if self.encoder_from is not None:
                raise ValueError("encoder_from needs init_from (the decoder) too; or remove it to train from scratch")
        else:
            for key in ("init_from", "encoder_from"):
                if (uri := getattr(self, key)) is not None:
                    check_init_source(key, uri)
            if encdec and self.encoder_from is None:
                raise ValueError("architecture: encoder-decoder from registered models needs encoder_from "
                                 "(a registered masked-LM encoder) beside init_from (the GPT decoder)")  # fmt: skip
            if not encdec and self.encoder_from is not None:
                raise ValueError("encoder_from is for architecture: encoder-decoder; remove it or set the architecture")
            if self.model is not None or self.tokenizer is not None:
                raise ValueError(
                    f"the architecture and tokenizer come from {self.init_from}; remove `model:` and `tokenizer:`"
                )
        self._check_export({"hf": "a seq2seq model has no Transformers export here",
                            "onnx": "a seq2seq model (its decoding loop) has no ONNX export here"})  # fmt: skip
        self._check_promote_metric("seq2seq", "seq2seq")
        return self

    @property
    def scratch(self) -> bool:
        return self.init_from == "scratch"

    def model_summary(self) -> str:
        source = shape(self.model) if self.scratch else self.init_from
        return f"{self.architecture} seq2seq on {source}" + (f" + {self.encoder_from}" if self.encoder_from else "")


PAIR_DATA = TypeAdapter(PairData)


def _application(data: dict) -> str:
    """The application a pairs source serves (for the default gate); an invalid source is reported by its own
    validation, and gates translation's metric meanwhile."""
    try:
        return PAIR_DATA.validate_python(data).application
    except ValidationError:
        return "translation"


AnySpec = Annotated[PipelineSpec | ClassifierSpec | Seq2SeqSpec, Field(discriminator="task")]
SPEC = TypeAdapter(AnySpec)


def validate_spec(
    value: dict | PipelineSpec | ClassifierSpec | Seq2SeqSpec,
) -> PipelineSpec | ClassifierSpec | Seq2SeqSpec:
    """A spec from its JSON form (as a deployment stores it); `task` defaults to language-model."""
    if isinstance(value, dict):
        return SPEC.validate_python({"task": "language-model", **value})
    return value


class PipelinesFile(Frozen):
    """The whole file: a default pipeline name and the named pipelines."""

    pipelines: dict[str, AnySpec]
    default: str  # declared after `pipelines` so its validator can see them

    @field_validator("pipelines", mode="before")
    @classmethod
    def _names_from_keys(cls, value: object) -> object:
        if isinstance(value, dict):
            return {
                k: ({"name": k, "task": "language-model"} | v if isinstance(v, dict) else v) for k, v in value.items()
            }
        return value

    @field_validator("pipelines")
    @classmethod
    def _valid_names(cls, value: dict) -> dict:
        bad = [k for k in value if not NAME.match(k)]
        if bad:
            raise ValueError(
                f"pipeline names {bad} are not valid: use lower-case letters, digits, '.', '_' or '-' "
                "(they become registered-model names)"
            )
        for key, spec in value.items():
            if spec.name != key:
                raise ValueError(f"pipeline {key!r} sets name {spec.name!r}; remove `name:`, the key is the name")
        return value

    @field_validator("default")
    @classmethod
    def _default_exists(cls, value: str, info: ValidationInfo) -> str:
        pipelines = info.data.get("pipelines")
        if pipelines is not None and value not in pipelines:
            raise ValueError(f"{value!r} is not one of the pipelines {sorted(pipelines)}")
        return value

    def get(self, name: str | None) -> PipelineSpec | ClassifierSpec | Seq2SeqSpec:
        """The named pipeline (the default when None); KeyError names the available ones."""
        key = name or self.default
        if key not in self.pipelines:
            raise KeyError(f"no pipeline named {key!r}; available: {', '.join(sorted(self.pipelines))}")
        return self.pipelines[key]


# ---------------------------------------------------------------- the bounded YAML loader


class YamlLimitError(ValueError):
    """The YAML text exceeds a loader limit; the message names the limit and where (path and/or line)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts aliases and nesting depth while composing the node graph."""

    def __init__(self, text: str):
        super().__init__(text)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise YamlLimitError(f"line {line}: more than {MAX_ALIASES} YAML aliases (*name); share less")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise YamlLimitError(f"line {line}: YAML nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, path: str, depth: int, seen: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, levels) ``node`` stands for once every alias is expanded, found without expanding anything:
    an anchored node is one object in the composed graph, shared by its aliases, so ``seen`` memoises it by id."""
    size, height = seen.get(id(node), (1, 1))
    if depth + height > MAX_DEPTH:  # an alias nests its anchor's levels where it stands; a cycle never ends
        raise YamlLimitError(
            f"{path or '(top level)'} (line {node.start_mark.line + 1}): YAML nested deeper than {MAX_DEPTH} "
            "levels once aliases are expanded"
        )
    if id(node) in seen:
        return size, height
    children: list[tuple[yaml.Node, str]] = []
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            where = f"{path}.{key.value}".lstrip(".") if isinstance(key, yaml.ScalarNode) else path
            children += [(key, where), (value, where)]
    elif isinstance(node, yaml.SequenceNode):
        children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
    for child, where in children:
        child_size, child_height = _expanded_size(child, where, depth + 1, seen)
        size, height = size + child_size, max(height, child_height + 1)
        if size > MAX_VALUES:
            raise YamlLimitError(
                f"{path or '(top level)'} (line {node.start_mark.line + 1}): YAML aliases expand to more than "
                f"{MAX_VALUES} values; anchors are for sharing settings, not multiplying them"
            )
    seen[id(node)] = (size, height)
    return size, height


def load_yaml(text: str) -> object:
    """``yaml.safe_load(text)`` within the loader limits; YamlLimitError (or yaml.YAMLError) otherwise."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, "", 0, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _tags(annotated: object) -> set[str]:
    """The tag values of a discriminated union such as ModelConfig ({"gpt", "lstm", ...})."""
    union, field = get_args(annotated)
    return {get_args(m.model_fields[field.discriminator].annotation)[0] for m in get_args(union)}


UNION_TAGS = {
    "model": _tags(ModelConfig),
    "tokenizer": _tags(TokenizerConfig),
    "data": _tags(DataConfig) | _tags(LabelledData),
}


def _location(loc: tuple) -> str:
    """The YAML path of an error, without the union tag pydantic inserts (``model.gpt.num_layers``)."""
    parts = [
        p
        for i, p in enumerate(loc)
        if not (i and p in UNION_TAGS.get(loc[i - 1], ())) and not (i == 2 and loc[0] == "pipelines" and p in TASKS)
    ]
    return ".".join(str(part) for part in parts) or "(top level)"


def _yaml_error(e: yaml.YAMLError, text: str) -> str:
    """A YAML syntax error as ``line L, column C: not valid YAML: …`` followed by the source line and a caret
    under the column (PyYAML's own message repeats the snippet with its own indentation)."""
    mark = getattr(e, "problem_mark", None)
    if not isinstance(e, yaml.MarkedYAMLError) or mark is None:
        return f"not valid YAML: {e}".replace("\n", " ")
    problem = " ".join((e.problem or "").split())
    context = (
        e.context
        and e.context_mark
        and f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    )
    lines = text.splitlines()
    source = lines[mark.line] if mark.line < len(lines) else ""
    start = max(0, mark.column - 80)  # a very long line is shown around the column
    shown = source[start : start + 160].replace("\t", " ")
    return (
        f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}{context or ''}\n"
        f"  {shown}\n  {' ' * (mark.column - start)}^"
    )


def _members(annotation: object) -> list[object]:
    """The types an annotation allows, with Annotated, unions and Optional unwrapped."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _models(kinds: list[object]) -> list[type[BaseModel]]:
    return [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]


def _step(kinds: list[object], part: object) -> list[object]:
    """The types at ``part`` below ``kinds`` (a field name, a dict key, a list index or a union tag)."""
    models = _models(kinds)
    if any(part in m.model_fields for m in models):
        return [t for m in models if part in m.model_fields for t in _members(m.model_fields[part].annotation)]
    tagged = [m for m in models if any(part in get_args(f.annotation) for f in m.model_fields.values())]
    if tagged:  # pydantic puts a discriminated union's tag in the location: keep that member
        return tagged
    out = []
    for kind in kinds:
        if get_origin(kind) is dict:
            out += _members(get_args(kind)[1])
        elif get_origin(kind) in (list, tuple) and get_args(kind):
            out += _members(get_args(kind)[0])
    return out


def _suggestion(loc: tuple) -> str:
    """``; did you mean X?`` for an unknown key whose spelling is close to a field of the same section."""
    kinds: list[object] = [PipelinesFile]
    for part in loc[:-1]:
        kinds = _step(kinds, part)
    names = {name for m in _models(kinds) for name in m.model_fields}
    close = difflib.get_close_matches(str(loc[-1]), sorted(names), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _problems(e: ValidationError) -> list[tuple[tuple, str, str]]:
    """(YAML path parts, message, pydantic error type) of each error: union tags and validator names left out
    of the path; an unknown key's message suggests the close one."""
    out = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        path = _location(loc)
        parts = tuple(path.split(".")) if path != "(top level)" else ()
        message = err["msg"] + (_suggestion(loc) if err["type"] == "extra_forbidden" else "")
        out.append((parts, message, err["type"]))
    return out


def _without(raw: dict, paths: list[tuple]) -> tuple[dict, list[str]]:
    """``raw`` with the values at ``paths`` (inside a pipeline's block) removed, copying only what changes;
    and the names of the keys removed."""
    removed = []
    for path in paths:
        if len(path) < 3 or path[0] != "pipelines":
            continue  # the whole file or a whole block: nothing narrower to set aside
        node, copies = raw, []
        for key in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            copies.append((node, key))
            node = node[key]
        else:
            if path[-1] not in node:
                continue
            parent = {k: v for k, v in node.items() if k != path[-1]}
            for holder, key in reversed(copies):
                parent = {**holder, key: parent}
            raw = parent
            removed.append(str(path[-1]))
    return raw, removed


def validate_file(raw: dict) -> PipelinesFile:
    """Validate a parsed pipelines file; raises ValidationProblems listing every problem it can find.

    A block's cross-field checks (pydantic model validators) only run once its fields are valid, so a
    block with a bad field and a cross-field mistake would report only the first. Each bad value is set
    aside (its default takes its place) and the file validated again to find the rest. A problem that
    names a key set aside is not reported: it may come from the default, not from the file."""
    try:
        return PipelinesFile.model_validate(raw)
    except ValidationError as e:
        found = _problems(e)
    problems = [(parts, message) for parts, message, _ in found]
    set_aside: set[str] = set()
    for _ in range(3):  # each round can only reveal the checks of the level above
        raw, removed = _without(raw, [parts for parts, _, kind in found if kind != "missing"])
        if not removed:
            break
        set_aside |= set(removed)
        try:
            PipelinesFile.model_validate(raw)
            break
        except ValidationError as e:
            found = _problems(e)
        for parts, message, _ in found:
            named = set(re.findall(r"\w+", message)) & set_aside
            if (parts, message) not in problems and not named:
                problems.append((parts, message))
    raise ValidationProblems(problems)


class ValidationProblems(ValueError):
    """Every problem of a pipelines file: (YAML path parts, message) pairs."""

    def __init__(self, problems: list[tuple[tuple, str]]):
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


def _listing(problems: list[tuple[tuple, str]]) -> list[str]:
    return [f"{'.'.join(parts) or '(top level)'}: {message}" for parts, message in problems]


def _read_yaml(text: str, source: str) -> dict:
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise ConfigError(source, [f"file is larger than {MAX_FILE_BYTES} bytes"])
    try:
        raw = load_yaml(text)
    except YamlLimitError as e:
        raise ConfigError(source, [str(e)]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [_yaml_error(e, text)]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["expected a mapping with `default:` and `pipelines:`"])
    return raw


def parse_pipelines(
    text: str,
    source: str = "pipelines.yaml",
    *,
    overrides: list[str] | tuple[str, ...] = (),
    pipeline: str | None = None,
) -> PipelinesFile:
    """Validate YAML text, with ``overrides`` (``KEY=VALUE``, dotted keys into the block of ``pipeline``, by
    default the file's default pipeline) applied; raises ConfigError listing every problem."""
    raw = _read_yaml(text, source)
    if not overrides:
        try:
            return validate_file(raw)
        except ValidationProblems as e:
            raise ConfigError(source, _listing(e.problems)) from None
    return _with_overrides(raw, source, list(overrides), pipeline)


def load_pipelines(
    path: Path | str = "pipelines.yaml", *, overrides: list[str] | tuple[str, ...] = (), pipeline: str | None = None
) -> PipelinesFile:
    """Read and validate a pipelines file, with command-line ``overrides`` applied to ``pipeline``'s block."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; pass --config PATH to a pipelines.yaml"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), [f"cannot read: {e}"]) from None
    return parse_pipelines(text, str(path), overrides=overrides, pipeline=pipeline)


# ---------------------------------------------------------------- command-line overrides (-o KEY=VALUE)

DOTTED = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


class OverrideError(ValueError):
    """One ``-o`` option is malformed; the message starts with the option as given."""


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.max_steps=200"`` → (["train", "max_steps"], 200): the value read as YAML by the bounded loader."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"-o {text}: expected KEY=VALUE, e.g. -o train.max_steps=200")
    if not DOTTED.match(key):
        raise OverrideError(f"-o {text}: {key!r} is not a dotted key like train.max_steps")
    try:
        parsed = load_yaml(value)
    except (yaml.YAMLError, YamlLimitError) as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OverrideError(f"-o {text}: not a valid YAML value ({problem}); quote it, e.g. -o '{key}=\"…\"'") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if isinstance(parsed, dict) or any(isinstance(item, dict | list) for item in items):
        what = "a mapping" if isinstance(parsed, dict) else "a nested value"
        raise OverrideError(
            f"-o {text}: {what} is not a plain value (a string, number, boolean or null, or a list of those); "
            "set each leaf by its dotted key"
        )
    return key.split("."), parsed


def apply_overrides(block: dict, overrides: list[str]) -> dict:
    """A pipeline's block with ``KEY=VALUE`` overrides applied (a copy; shared anchors stay untouched).
    Raises OverrideError naming the option when one is malformed or sets a key below a plain value."""
    for text in overrides:
        keys, value = parse_override(text)
        block = _set(block, keys, value, text)
    return block


def _set(node: dict, keys: list[str], value: object, text: str, above: tuple[str, ...] = ()) -> dict:
    head, *rest = keys
    if not rest:
        return {**node, head: value}
    child = node.get(head)
    if child is None:
        child = {}
    if not isinstance(child, dict):
        where = ".".join((*above, head))
        raise OverrideError(f"-o {text}: {where} is a value, not a section; set {where} itself")
    return {**node, head: _set(child, rest, value, text, (*above, head))}


def _with_overrides(raw: dict, source: str, overrides: list[str], pipeline: str | None) -> PipelinesFile:
    """Validate ``raw`` with ``overrides`` applied to one block. Problems the file has without them are listed
    by their YAML path; the others by the option that caused them (the one whose key they are under, else all)."""
    try:
        base = validate_file(raw)
        before: list[tuple[tuple, str]] = []
    except ValidationProblems as e:
        base, before = None, e.problems
    name = pipeline or (base.default if base else raw.get("default"))
    blocks = raw.get("pipelines")
    if not isinstance(blocks, dict) or name not in blocks or not isinstance(blocks[name] or {}, dict):
        if before:
            raise ConfigError(source, _listing(before))
        return base  # an unknown pipeline: `get` names the ones there are
    bad, block = [], blocks[name] or {}
    for text in overrides:
        try:
            block = apply_overrides(block, [text])
        except OverrideError as e:
            bad.append(str(e))
    try:
        checked = validate_file({**raw, "pipelines": {**blocks, name: block}})
        if not bad:
            return checked  # valid with the overrides (even where they mend the file)
        after: list[tuple[tuple, str]] = []
    except ValidationProblems as e:
        after = e.problems
    problems = _listing([p for p in before if p in after]) + bad
    for parts, message in after:
        if (parts, message) in before:
            continue
        inside = parts[2:] if parts[:2] == ("pipelines", name) else None
        problems.append(_blame(inside, message, overrides) if inside is not None else _listing([(parts, message)])[0])
    raise ConfigError(source, problems)


def _blame(inside: tuple, message: str, overrides: list[str]) -> str:
    """A problem inside the overridden block, as the option(s) that caused it and the path in the block."""
    path = ".".join(inside)
    keys = {text: tuple(text.partition("=")[0].strip().split(".")) for text in overrides}
    mine = [t for t, k in keys.items() if inside and (k[: len(inside)] == inside or inside[: len(k)] == k)]
    options = ", ".join(f"-o {t}" for t in (mine or overrides))
    if message.startswith("Extra inputs are not permitted"):
        return f"{options}: unknown key {path}{message.removeprefix('Extra inputs are not permitted')}"
    return f"{options}: {path + ': ' if path else ''}{message}"
