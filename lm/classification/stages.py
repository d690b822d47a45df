"""Classification stages as pure functions from configs and typed results (``lm.results``) to typed results.

prepare (labelled examples) → encode (with the initialising model's tokenizer, or one trained on the
training texts) → fit (the one training loop) → evaluate (label accuracy, macro-F1, per-class scores,
confusion matrix, majority baseline) → export (the files a served classifier needs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lm import package as packaging
from lm.cache import Entry, StageCache
from lm.checkpoint import load_checkpoint, load_weights, sha256_file
from lm.classification.batches import ExampleBatches
from lm.classification.config import HeadConfig, LabelledData
from lm.classification.data import build_dataset, read_examples
from lm.classification.examples import Examples, encode_examples
from lm.classification.metrics import confusion_matrix, majority_baseline, predict, scores
from lm.classification.model import Classifier, build_classifier, resolve_class_weights
from lm.config import ModelConfig, TokenizerConfig, TrainConfig
from lm.errors import DataError
from lm.results import EncodedExamples, Evaluation, LabelledDataset, Package, Trained
from lm.runtime import Runtime, resolve_runtime
from lm.tokenizers import load_tokenizer, tokenizer_digest, train_tokenizer
from lm.training import fit as fit_model
from lm.versions import code_digest

SPLITS = ("train", "val", "test")


def prepare(cfg: LabelledData, root: Path, *, base_dir: Path) -> LabelledDataset:
    """Labelled examples split into ``root/<digest>`` (or reused)."""
    found = build_dataset(cfg, Path(root), base_dir=Path(base_dir))
    return LabelledDataset.model_validate(found)


def encode(
    dataset: LabelledDataset, tokenizer: TokenizerConfig | Path, root: Path, *, max_tokens: int
) -> EncodedExamples:
    """Tokenize every split with ``tokenizer`` — a tokenizer.json (the initialising model's, so ids mean what
    they meant in pretraining) or a config to train one on the training texts — into ``root/<key>``."""
    root = Path(root)
    if isinstance(tokenizer, Path | str):
        tok, source = load_tokenizer(Path(tokenizer)), "init model"
    else:
        tok, source = (
            train_tokenizer(tokenizer, "\n".join(e["text"] for e in read_examples(dataset.path, "train"))),
            None,
        )
    digest = tokenizer_digest(tok)
    inputs = {
        "data_digest": dataset.digest,
        "tokenizer_digest": digest,
        "max_tokens": max_tokens,
        "code": code_digest("lm.classification.examples", "lm.tokenizers"),
    }

    def intact(entry: Entry) -> bool:
        files, examples = entry.manifest["files"], entry.manifest["examples"]
        return isinstance(examples, dict) and all(sha256_file(entry.path / f) == h for f, h in files.items())

    def build(tmp: Path) -> dict:
        tok.save(tmp / "tokenizer.json")
        examples = {}
        for split in SPLITS:
            rows = read_examples(dataset.path, split)
            if rows:
                encode_examples(tok, rows, max_tokens).save(tmp / f"{split}.safetensors")
                examples[split] = len(rows)
        return {"files": {f.name: sha256_file(f) for f in tmp.iterdir()}, "examples": examples, **inputs}

    entry = StageCache(root, intact).get_or_build(inputs, build)
    return EncodedExamples(
        path=str(entry.path),
        key=entry.key,
        data_digest=dataset.digest,
        dataset_path=dataset.path,
        tokenizer_digest=digest,
        tokenizer_source=source or tokenizer.kind,
        vocab_size=tok.vocab_size,
        labels=dataset.labels,
        class_counts=dataset.class_counts,
        inputs=inputs,
        examples=entry.manifest["examples"],
        max_tokens=max_tokens,
        cached=entry.cached,
    )


def load_split(encoded: EncodedExamples, split: str) -> Examples:
    return Examples.load(Path(encoded.path) / f"{split}.safetensors")


def _check_vocabulary(examples: Examples, vocab_size: int, split: str) -> None:
    if examples.ids.size and int(examples.ids.max()) >= vocab_size:
        raise DataError(
            f"{split} token ids reach {int(examples.ids.max())} but the backbone has {vocab_size} ids: the tokenizer "
            "does not belong to the initialising model"
        )


def fit(
    encoded: EncodedExamples,
    model_cfg: ModelConfig,
    head: HeadConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    init_weights: Path | None,
    **hooks,
) -> Trained:
    """Build the classifier (seeded), load the pretrained backbone, train and write ``out_dir/final``
    (``hooks``: ``lm.training.fit``'s keyword arguments)."""
    labels = list(encoded.labels)

    def build() -> Classifier:
        weights = resolve_class_weights(head.class_weights, labels, encoded.class_counts["train"])
        model = build_classifier(model_cfg, encoded.vocab_size, head, len(labels), weights)
        if init_weights is not None:
            load_weights(Path(init_weights), model.backbone)
        return model

    def data(model: Classifier) -> tuple[ExampleBatches, ExampleBatches]:
        train_split, val_split = load_split(encoded, "train"), load_split(encoded, "val")
        for split, examples in (("train", train_split), ("val", val_split)):
            _check_vocabulary(examples, model.vocab_size, split)
        return ExampleBatches(train_split), ExampleBatches(val_split)

    def card(model: Classifier) -> dict:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable_parameters": trainable, "num_classes": len(labels)}

    state = {
        "task": "classification",
        "model": model_cfg.model_dump(mode="json"),
        "head": head.model_dump(mode="json"),
        "labels": labels,
        "vocab_size": encoded.vocab_size,
        "tokenizer_digest": encoded.tokenizer_digest,
        "data_digest": encoded.data_digest,
        "init_weights": sha256_file(Path(init_weights)) if init_weights else None,
    }
    return fit_model(build, data, train_cfg, Path(out_dir), state, card=card, **hooks)


def load_classifier(checkpoint: Path, model_cfg: ModelConfig, head: HeadConfig, vocab_size: int, labels) -> Classifier:
    model = build_classifier(model_cfg, vocab_size, head, len(labels))
    load_checkpoint(Path(checkpoint), model)
    return model.eval()


def score_examples(model: Classifier, examples: Examples, labels: list[str], train_labels: np.ndarray, *,
                   prefix: str, batch_size: int, device, autocast_dtype) -> tuple[dict, list[list[int]]]:  # fmt: skip
    """Metrics of ``model`` on ``examples`` (and of the majority baseline) and the confusion matrix."""
    probs, loss = predict(model, examples, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    matrix = confusion_matrix(examples.labels, probs.argmax(1), len(labels))
    metrics = {f"{prefix}_loss_per_example": loss} | scores(matrix, labels, prefix)
    metrics |= majority_baseline(train_labels, examples.labels, labels, prefix)
    return metrics, matrix.tolist()


def evaluate(encoded: EncodedExamples, checkpoint: Path, model_cfg: ModelConfig, head: HeadConfig,
             train_cfg: TrainConfig) -> Evaluation:  # fmt: skip
    """Validation (and test) metrics, confusion matrices, per-class scores and a few example predictions."""
    runtime = resolve_runtime(train_cfg)
    device, amp_dtype = runtime.device, runtime.amp_dtype
    labels = list(encoded.labels)
    model = load_classifier(checkpoint, model_cfg, head, encoded.vocab_size, labels).to(device)
    train_labels = load_split(encoded, "train").labels
    metrics, confusion = {}, {}
    for split in [s for s in ("val", "test") if s in encoded.examples]:
        m, matrix = score_examples(
            model,
            load_split(encoded, split),
            labels,
            train_labels,
            prefix=split,
            batch_size=train_cfg.batch_size,
            device=device,
            autocast_dtype=amp_dtype,
        )
        metrics |= m
        confusion[split] = matrix
    rows = read_examples(Path(encoded.dataset_path), "val")[:: max(1, encoded.examples["val"] // 8)][:8]
    shown = encode_examples(load_tokenizer(encoded.tokenizer_file), rows, encoded.max_tokens)
    probs, _ = predict(model, shown, device=device, autocast_dtype=amp_dtype)
    samples = [
        {"text": r["text"], "label": labels[r["label"]], "predicted": labels[int(p.argmax())], "p": float(p.max())}
        for r, p in zip(rows, probs, strict=True)
    ]
    tables = {f"evaluation/per_class_{s}.json": per_class(metrics, labels, s) for s in confusion}
    return Evaluation(
        metrics=metrics,
        summary=predictions_text(samples),
        samples=samples,
        confusion=confusion,
        labels=labels,
        tables=tables | {"predictions.json": samples},
    )


def per_class(metrics: dict[str, float], labels, split: str = "val") -> list[dict]:
    """Precision, recall and F1 of each class on ``split``."""
    return [
        {
            "label": name,
            "precision": round(metrics[f"{split}_precision_{name}"], 4),
            "recall": round(metrics[f"{split}_recall_{name}"], 4),
            "f1": round(metrics[f"{split}_f1_{name}"], 4),
        }
        for name in labels
    ]


def predictions_text(samples) -> str:
    """Example predictions, one per line, for the terminal."""
    lines = []
    for s in samples:
        text = " / ".join(s["text"].strip().splitlines())
        mark = "✓" if s["predicted"] == s["label"] else "✗"
        lines.append(f"{mark} {s['predicted']} ({s['p']:.2f}), true {s['label']}: {text[:90]}")
    return "\n".join(lines)


def evaluate_package(package: Package, dataset_path: Path, runtime: Runtime, *, batch_size: int = 32) -> dict:
    """A packaged classifier's validation metrics on another dataset, tokenized with its own tokenizer.
    When the dataset's classes are not the package's, the metrics are NaN: there is nothing to compare."""
    loaded = packaging.load(package)
    manifest = json.loads((Path(dataset_path) / "manifest.json").read_text())
    names = loaded.config["labels"]
    if list(manifest["labels"]) != list(names):
        return {"val_loss_per_example": math.nan, "val_label_accuracy": math.nan, "val_macro_f1": math.nan}
    examples = encode_examples(loaded.tokenizer, read_examples(Path(dataset_path), "val"), loaded.config["max_tokens"])
    probs, loss = predict(
        loaded.model.to(runtime.device), examples, batch_size=batch_size, device=runtime.device,
        autocast_dtype=runtime.amp_dtype,
    )  # fmt: skip
    matrix = confusion_matrix(examples.labels, probs.argmax(1), len(names))
    return {"val_loss_per_example": loss} | scores(matrix, names, "val")
