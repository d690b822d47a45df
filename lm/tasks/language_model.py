"""Language modelling (``task: language-model``, the default): a corpus → a tokenizer trained on its training
split → token shards → a causal (GPT, LSTM) or masked (encoder) language model → loss, bits per character and
samples → a package that generates text (or, for an encoder, embeds it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torch import nn

from lm import data, shards, stages
from lm import package as packaging
from lm import plan as planning
from lm.cache import inputs_key
from lm.config import MODEL_CONFIG, ModelConfig, flatten
from lm.errors import DataError
from lm.generation import GENERATION_DEFAULTS
from lm.metrics import GATE_METRICS
from lm.models import build_model
from lm.report import Card, DatasetRecord, Table, code_block, shape
from lm.results import Corpus, Encoded, Evaluation, Init, Package, Prepared, Served, TokenShards, Trained
from lm.runtime import Runtime
from lm.sources import describe
from lm.tasks.base import init_tags
from lm.tokenizers import load_tokenizer

HEADLINE = ("val_bpc", "val_loss", "val_perplexity", "val_accuracy", "test_bpc", "test_loss", "test_accuracy",
            "val_mlm_loss", "val_mlm_perplexity", "test_mlm_loss")  # fmt: skip


class LanguageModel:
    name: ClassVar[str] = "language-model"
    data_root: ClassVar[str] = "data"
    tokens_root: ClassVar[str] = "tokens"
    encoded_type: ClassVar[type[Encoded]] = TokenShards
    summary_metrics: ClassVar[tuple[str, ...]] = ("val_loss", "val_bpc", "val_mlm_loss")

    def __init__(self, spec):
        self.spec = spec

    # ------------------------------------------------------------------ data
    def init_from(self) -> str | None:
        return None if self.spec.scratch else self.spec.init_from

    def init_parts(self) -> dict[str, str]:
        return {}

    def check_init(self, init: Init) -> None:
        """Further pretraining starts from a language model whose objective the gate's metric measures."""
        task = packaging.task_name(packaging.read_config(init.package))
        if task != self.name:
            raise DataError(f"init_from {init.requested} is a {task} model; further pretraining needs a language model")
        objective = "mlm" if init.model["kind"] == "encoder" else "causal"
        if self.spec.promote.metric not in GATE_METRICS[objective]:
            raise DataError(
                f"init_from {init.requested} is a {init.model['kind']} model, which does not report "
                f"promote.metric {self.spec.promote.metric!r}; choose one of {', '.join(GATE_METRICS[objective])}"
            )

    def model_config(self, init: Init | None) -> ModelConfig:
        """The architecture: the spec's, or the initialising model's."""
        return MODEL_CONFIG.validate_python(init.model) if init is not None else self.spec.model

    def prepare(self, root: Path, *, base_dir: Path) -> Corpus:
        # An initialised model's context is known once the run resolves it: tokenize checks the lengths then.
        context = self.spec.model.context_length if self.spec.model is not None else 1
        return stages.ingest(self.spec.data, root, base_dir=base_dir, context_length=context)

    def encode(self, prepared: Prepared, init: Init | None, root: Path) -> TokenShards:
        tokenizer = load_tokenizer(Path(init.package.tokenizer)) if init is not None else self.spec.tokenizer
        context = self.model_config(init).context_length
        return stages.tokenize(prepared, tokenizer, root, context_length=context, workers=self.spec.data_workers)

    def ingest_key(self, base_dir: Path) -> str:
        return inputs_key(data.ingest_inputs(self.spec.data, Path(base_dir)))

    def tokens_key(self, data_digest: str) -> str | None:
        if not self.spec.scratch:
            return None  # the tokenizer is the initialising model's, known once a run resolves it
        return inputs_key(shards.tokenize_inputs(data_digest, self.spec.tokenizer))

    def describe(self) -> str:
        return describe(self.spec.data)

    def dataset(self, prepared: Corpus) -> DatasetRecord:
        manifest = json.loads((Path(prepared.path) / "manifest.json").read_text())
        rows = [{"title": t, "genre": g} for t, g in zip(manifest["titles"], manifest["genres"], strict=True)]
        counts = {f"data_chars_{split}": n for split, n in prepared.chars.items()}
        return DatasetRecord(rows, self.describe(), prepared.path, prepared.digest, counts | {
            "data_documents": prepared.documents
        })  # fmt: skip

    def params(self, encoded: TokenShards, init: Init | None) -> dict:
        """A word tokenizer's out-of-vocabulary rate per split (``tokenizer_oov_rate_train`` …), known before
        training; the evaluation logs ``val_oov_rate`` beside ``val_bpc`` too."""
        oov = {f"tokenizer_oov_rate_{split}": f"{rate:.6g}" for split, rate in encoded.oov_rate.items()}
        if init is None:
            return oov
        model = flatten(self.model_config(init).model_dump(mode="json"), "model")
        return oov | model | {"tokenizer.kind": encoded.tokenizer}  # what the initialising model brings

    def lineage_tags(self, init: Init | None) -> dict[str, str]:
        return init_tags(init)

    # ------------------------------------------------------------------ model
    def fit(self, encoded: TokenShards, init: Init | None, out: Path, *, on_start: Callable | None = None,
            **hooks) -> Trained:  # fmt: skip
        return stages.fit(encoded, self.model_config(init), self.spec.train, out, init=init, on_start=on_start,
                          **hooks)  # fmt: skip

    def evaluate(self, encoded: TokenShards, trained: Trained, init: Init | None) -> Evaluation:
        spec = self.spec
        return stages.evaluate(encoded, trained.checkpoint, self.model_config(init), spec.train, spec.eval)

    def export(self, encoded: TokenShards, trained: Trained, init: Init | None, out_dir: Path) -> Package:
        config = {
            "model": self.model_config(init).model_dump(mode="json"),
            "vocab_size": encoded.vocab_size,
            "generation": self.spec.eval.model_dump(mode="json"),
        }
        weights = Path(trained.checkpoint) / packaging.FILES["weights"]
        return packaging.export(out_dir, weights=weights, tokenizer=encoded.tokenizer_file, config=config)

    def served(self, evaluation: Evaluation, trained: Trained, encoded: Encoded) -> Served:
        prompt = self.spec.eval.prompt
        if trained.card.get("objective") == "causal":
            return Served(example_input=prompt, example_output=[prompt + "..."], params=dict(GENERATION_DEFAULTS))
        return Served(example_input=prompt, example_output=[[0.0] * int(trained.card.get("feature_dim", 1))])

    def version_tags(self, evaluation: Evaluation) -> dict[str, str]:
        return {k: f"{v:.6g}" for k, v in evaluation.metrics.items()}

    # ------------------------------------------------------------------ report
    def card(self, encoded: TokenShards, trained: Trained, evaluation: Evaluation, init: Init | None) -> Card:
        spec, c = self.spec, trained.card
        model = self.model_config(init).model_dump(mode="json")
        samples = [s for s in evaluation.samples] or [{"prompt": "", "output": evaluation.summary}]
        shown = "\n\n".join(
            f"**{s['prompt'].strip() or '(empty)'}**\n\n{code_block(s['output'])}" for s in evaluation.samples
        ) or code_block(evaluation.summary)
        oov = encoded.oov_rate.get("val")
        unknown = "" if oov is None else f", {oov:.2%} of validation tokens `<unk>`"
        return Card(
            rows=[
                ("architecture", f"{model['kind']} ({shape(model)})"),
                ("parameters", f"{c['num_parameters']:,} ({c['num_parameters_non_embedding']:,} non-embedding)"),
                ("training FLOPs per token", f"{c['flops_per_token']:,.0f}"),
                (
                    "tokenizer",
                    f"{encoded.tokenizer}, {encoded.vocab_size} ids, digest `{encoded.tokenizer_digest[:12]}`{unknown}",
                ),
                (
                    "data",
                    f"{spec.data.source}, digest `{encoded.data_digest[:12]}`, "
                    f"{encoded.chars.get('train', 0):,} training characters",
                ),
            ],  # fmt: skip
            headline=HEADLINE,
            metrics_note=f"Evaluation protocol: {evaluation.protocol}.",
            sections=[("Samples", shown)],
            tables=[Table("samples", samples, "generations from the fixed prompts", "samples.json")],
        )

    # ------------------------------------------------------------------ packages
    def evaluate_package(self, package: Package, data_path: Path, runtime: Runtime) -> dict[str, float]:
        return stages.evaluate_package(package, data_path, runtime, batch_size=self.spec.train.batch_size)

    def plan(self, workdir: Path, base_dir: Path, resume, *, verify: bool = False) -> list:
        return planning.plan(
            self.spec.name, self.spec.data, self.spec.tokenizer, workdir=workdir, base_dir=base_dir, resume=resume,
            init_from=self.init_from(), verify=verify,
        )  # fmt: skip

    @staticmethod
    def build_packaged(config: dict) -> nn.Module:
        return build_model(MODEL_CONFIG.validate_python(config["model"]), config["vocab_size"])
