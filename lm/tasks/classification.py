"""Text classification (``task: classification``): labelled examples → the initialising language model's
tokenizer (or one trained on the training texts) → a backbone (a registered language model's, or a fresh one)
with a classification head → label accuracy, macro-F1, per-class scores and a majority baseline → a package
that answers a label and its probabilities."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torch import nn

from lm import package as packaging
from lm import plan as planning
from lm.cache import inputs_key
from lm.classification import data as labelled
from lm.classification import stages
from lm.classification.config import HeadConfig
from lm.classification.model import build_classifier
from lm.config import MODEL_CONFIG, ModelConfig, flatten
from lm.errors import DataError
from lm.report import Card, DatasetRecord, Table, code_block, shape
from lm.results import Encoded, EncodedExamples, Evaluation, Init, LabelledDataset, Package, Served, Trained
from lm.runtime import Runtime
from lm.tasks.base import init_tags

HEADLINE = (
    "val_macro_f1", "val_label_accuracy", "val_baseline_macro_f1", "val_baseline_label_accuracy",
    "val_loss_per_example", "val_macro_precision", "val_macro_recall", "test_macro_f1", "test_label_accuracy",
    "test_baseline_macro_f1",
)  # fmt: skip


class Classification:
    name: ClassVar[str] = "classification"
    data_root: ClassVar[str] = "labelled"
    tokens_root: ClassVar[str] = "labelled-tokens"
    encoded_type: ClassVar[type[Encoded]] = EncodedExamples
    summary_metrics: ClassVar[tuple[str, ...]] = ("val_macro_f1", "val_label_accuracy", "val_baseline_macro_f1")

    def __init__(self, spec):
        self.spec = spec

    # ------------------------------------------------------------------ data
    def init_from(self) -> str | None:
        return None if self.spec.scratch else self.spec.init_from

    def init_parts(self) -> dict[str, str]:
        return {}

    def check_init(self, init: Init) -> None:
        task = packaging.task_name(packaging.read_config(init.package))
        if task != "language-model":
            raise DataError(f"init_from {init.requested} is a {task} model; initialise from a language model")

    def prepare(self, root: Path, *, base_dir: Path) -> LabelledDataset:
        return stages.prepare(self.spec.data, root, base_dir=base_dir)

    def encode(self, prepared: LabelledDataset, init: Init | None, root: Path) -> EncodedExamples:
        tokenizer = Path(init.package.tokenizer) if init else self.spec.tokenizer
        return stages.encode(prepared, tokenizer, root, max_tokens=self.spec.data.max_tokens)

    def ingest_key(self, base_dir: Path) -> str:
        return inputs_key(labelled.dataset_inputs(self.spec.data, Path(base_dir)))

    def tokens_key(self, data_digest: str) -> str | None:
        return None  # the tokenizer may be the init model's, known once a run resolves it

    def describe(self) -> str:
        return labelled.describe(self.spec.data)

    def dataset(self, prepared: LabelledDataset) -> DatasetRecord:
        rows = [
            {"split": s, "label": label, "examples": n}
            for s, per in prepared.class_counts.items()
            for label, n in per.items()
        ]
        counts = {f"data_examples_{s}": n for s, n in prepared.examples.items()}
        return DatasetRecord(rows, self.describe(), prepared.path, prepared.digest, counts)

    def backbone(self, init: Init | None) -> ModelConfig:
        return MODEL_CONFIG.validate_python(init.model) if init else self.spec.model

    def params(self, encoded: EncodedExamples, init: Init | None) -> dict:
        if init is None:
            return {}
        return flatten({"model": init.model}) | {"tokenizer.kind": encoded.tokenizer_source}

    def lineage_tags(self, init: Init | None) -> dict[str, str]:
        return init_tags(init)

    # ------------------------------------------------------------------ model
    def fit(self, encoded: EncodedExamples, init: Init | None, out: Path, *, on_start: Callable | None = None,
            **hooks) -> Trained:  # fmt: skip
        spec = self.spec
        weights = Path(init.package.weights) if init else None
        return stages.fit(
            encoded, self.backbone(init), spec.head, spec.train, out, init_weights=weights, on_start=on_start, **hooks
        )

    def evaluate(self, encoded: EncodedExamples, trained: Trained, init: Init | None) -> Evaluation:
        spec = self.spec
        return stages.evaluate(encoded, trained.checkpoint, self.backbone(init), spec.head, spec.train)

    def export(self, encoded: EncodedExamples, trained: Trained, init: Init | None, out_dir: Path) -> Package:
        config = {
            "task": self.name,
            "model": self.backbone(init).model_dump(mode="json"),
            "vocab_size": encoded.vocab_size,
            "head": self.spec.head.model_dump(mode="json"),
            "labels": list(encoded.labels),
            "max_tokens": encoded.max_tokens,
        }
        weights = Path(trained.checkpoint) / packaging.FILES["weights"]
        return packaging.export(out_dir, weights=weights, tokenizer=encoded.tokenizer_file, config=config)

    def served(self, evaluation: Evaluation, trained: Trained, encoded: EncodedExamples) -> Served:
        labels = encoded.labels
        example = evaluation.samples[0]["text"] if evaluation.samples else "text"
        output = [{"label": labels[0], "probabilities": {name: 1.0 / len(labels) for name in labels}}]
        return Served(example_input=example, example_output=output)

    def version_tags(self, evaluation: Evaluation) -> dict[str, str]:
        kept = {k: f"{v:.6g}" for k, v in evaluation.metrics.items() if "_precision_" not in k and "_recall_" not in k}
        return {"task": self.name, "labels": json.dumps(list(evaluation.labels)), **kept}

    # ------------------------------------------------------------------ report
    def card(self, encoded: EncodedExamples, trained: Trained, evaluation: Evaluation, init: Init | None) -> Card:
        spec, c, head = self.spec, trained.card, self.spec.head
        model = self.backbone(init).model_dump(mode="json")
        lineage = (
            f"initialised from `{init.uri}` (asked for `{init.requested}`, run `{init.run_id}`)"
            if init
            else "trained from scratch (no pretrained weights)"
        )
        classes = stages.per_class(evaluation.metrics, evaluation.labels)
        table = "\n".join(
            f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |" for r in classes
        )
        return Card(
            rows=[
                ("lineage", lineage),
                ("backbone", f"{model['kind']} ({shape(model)})"),
                (
                    "head",
                    f"{head.pooling} pooling, dropout {head.dropout}, {head.freeze_layers} frozen layers, "
                    f"class weights {head.class_weights}",
                ),
                ("parameters", f"{c['num_parameters']:,} ({c['trainable_parameters']:,} trained)"),
                (
                    "tokenizer",
                    f"{encoded.tokenizer_source}, {encoded.vocab_size} ids, digest `{encoded.tokenizer_digest[:12]}`",
                ),
                ("data", f"{spec.data.source}, digest `{encoded.data_digest[:12]}`, examples {encoded.examples}"),
                ("classes", ", ".join(evaluation.labels)),
            ],  # fmt: skip
            headline=HEADLINE,
            metrics_note="Baseline: always the most frequent training class, on the same split.",
            sections=[
                ("Per class (validation)", "| class | precision | recall | F1 |\n|---|---|---|---|\n" + table),
                ("Example predictions", code_block(evaluation.summary)),
            ],
            tables=[
                Table("per-class", classes, "per-class precision, recall and F1 (validation)"),
            ],
        )

    # ------------------------------------------------------------------ packages
    def evaluate_package(self, package: Package, data_path: Path, runtime: Runtime) -> dict[str, float]:
        return stages.evaluate_package(package, data_path, runtime, batch_size=self.spec.train.batch_size)

    def plan(self, workdir: Path, base_dir: Path, resume, *, verify: bool = False) -> list:
        return planning.plan_examples(
            self.spec.name, lambda: labelled.dataset_inputs(self.spec.data, Path(base_dir)),
            lambda key: labelled.cached_dataset(Path(workdir) / self.data_root, key), what="examples",
            init_from=[] if self.spec.scratch else [self.spec.init_from], workdir=workdir, resume=resume,
        )  # fmt: skip

    @staticmethod
    def build_packaged(config: dict) -> nn.Module:
        head = HeadConfig.model_validate(config["head"])
        return build_classifier(MODEL_CONFIG.validate_python(config["model"]), config["vocab_size"], head,
                                len(config["labels"]))  # fmt: skip
