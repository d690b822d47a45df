"""Classification stages as pure functions from paths and configs to paths and small dicts.

prepare (labelled examples) → encode (with the initialising model's tokenizer, or one trained on the
training texts) → fit (the one training loop) → evaluate (label accuracy, macro-F1, per-class scores,
confusion matrix, majority baseline) → export (the files a served classifier needs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter

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
from lm.runtime import resolve_runtime
from lm.stages import model_card, run_training
from lm.tokenizers import load_tokenizer, tokenizer_digest, train_tokenizer
from lm.versions import code_digest

SPLITS = ("train", "val", "test")


def prepare(cfg: LabelledData, root: Path, *, base_dir: Path) -> dict:
    """Labelled examples split into ``root/<digest>`` (or reused); the manifest."""
    return build_dataset(cfg, Path(root), base_dir=Path(base_dir))


MODEL_CONFIG = TypeAdapter(ModelConfig)


def read_package_config(path: Path) -> tuple[ModelConfig, dict]:
    """A packaged model's architecture and its whole config.json."""
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    return MODEL_CONFIG.validate_python(config["model"]), config


def backbone_config(encoded: dict) -> ModelConfig:
    """The backbone the encode stage's result names (the init model's architecture, or the scratch one)."""
    return MODEL_CONFIG.validate_python(encoded["model"])


def encode(dataset: dict, tokenizer: TokenizerConfig | Path, root: Path, *, max_tokens: int) -> dict:
    """Tokenize every split with ``tokenizer`` — a tokenizer.json (the initialising model's, so ids mean what
    they meant in pretraining) or a config to train one on the training texts — into ``root/<key>``."""
    root = Path(root)
    if isinstance(tokenizer, Path | str):
        tok, source = load_tokenizer(Path(tokenizer)), "init model"
    else:
        tok, source = (
            train_tokenizer(tokenizer, "\n".join(e["text"] for e in read_examples(dataset["path"], "train"))),
            None,
        )
    digest = tokenizer_digest(tok)
    inputs = {
        "data_digest": dataset["digest"],
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
            rows = read_examples(dataset["path"], split)
            if rows:
                encode_examples(tok, rows, max_tokens).save(tmp / f"{split}.safetensors")
                examples[split] = len(rows)
        return {"files": {f.name: sha256_file(f) for f in tmp.iterdir()}, "examples": examples, **inputs}

    entry = StageCache(root, intact).get_or_build(inputs, build)
    return {
        "path": str(entry.path),
        "key": entry.key,
        "digest": entry.key,
        "data_digest": dataset["digest"],
        "dataset_path": dataset["path"],
        "tokenizer_digest": digest,
        "tokenizer_source": source or tokenizer.kind,
        "vocab_size": tok.vocab_size,
        "labels": dataset["labels"],
        "class_counts": dataset["class_counts"],
        "inputs": inputs,
        "examples": entry.manifest["examples"],
        "cached": entry.cached,
    }


def load_split(encoded: dict, split: str) -> Examples:
    return Examples.load(Path(encoded["path"]) / f"{split}.safetensors")


def _check_vocabulary(examples: Examples, vocab_size: int, split: str) -> None:
    if examples.ids.size and int(examples.ids.max()) >= vocab_size:
        raise DataError(
            f"{split} token ids reach {int(examples.ids.max())} but the backbone has {vocab_size} ids: the tokenizer "
            "does not belong to the initialising model"
        )


def fit(
    encoded: dict,
    model_cfg: ModelConfig,
    head: HeadConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    init_weights: Path | None,
    on_start: Callable[[dict], None] | None = None,
    **hooks,
) -> dict:
    """Build the classifier (seeded), load the pretrained backbone, train and write ``out_dir/final``
    (``on_start`` and ``hooks`` as for ``lm.stages.fit``)."""
    torch.manual_seed(train_cfg.seed)
    labels = encoded["labels"]
    weights = resolve_class_weights(head.class_weights, labels, encoded["class_counts"]["train"])
    model = build_classifier(model_cfg, encoded["vocab_size"], head, len(labels), weights)
    if init_weights is not None:
        load_weights(Path(init_weights), model.backbone)
    card = model_card(model) | {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_classes": len(labels),
    }
    if on_start is not None:
        on_start(card)
    train_split, val_split = load_split(encoded, "train"), load_split(encoded, "val")
    for split, examples in (("train", train_split), ("val", val_split)):
        _check_vocabulary(examples, model.vocab_size, split)
    state = {
        "task": "classification",
        "model": model_cfg.model_dump(mode="json"),
        "head": head.model_dump(mode="json"),
        "labels": labels,
        "vocab_size": encoded["vocab_size"],
        "tokenizer_digest": encoded["tokenizer_digest"],
        "data_digest": encoded["data_digest"],
        "init_weights": sha256_file(Path(init_weights)) if init_weights else None,
    }
    return card | run_training(
        model,
        ExampleBatches(train_split),
        ExampleBatches(val_split),
        train_cfg,
        Path(out_dir),
        state,
        **hooks,
    )


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


def evaluate(encoded: dict, checkpoint: Path, model_cfg: ModelConfig, head: HeadConfig, train_cfg: TrainConfig) -> dict:
    """Validation (and test) metrics, confusion matrices and a few example predictions."""
    runtime = resolve_runtime(train_cfg)
    device, amp_dtype = runtime.device, runtime.amp_dtype
    labels = encoded["labels"]
    model = load_classifier(checkpoint, model_cfg, head, encoded["vocab_size"], labels).to(device)
    train_labels = load_split(encoded, "train").labels
    metrics, confusion = {}, {}
    for split in [s for s in ("val", "test") if s in encoded["examples"]]:
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
    rows = read_examples(Path(encoded["dataset_path"]), "val")[:: max(1, encoded["examples"]["val"] // 8)][:8]
    tok = load_tokenizer(Path(encoded["path"]) / "tokenizer.json")
    shown = encode_examples(tok, rows, encoded["inputs"]["max_tokens"])
    probs, _ = predict(model, shown, device=device, autocast_dtype=amp_dtype)
    samples = [
        {"text": r["text"], "label": labels[r["label"]], "predicted": labels[int(p.argmax())], "p": float(p.max())}
        for r, p in zip(rows, probs, strict=True)
    ]
    return {"metrics": metrics, "confusion": confusion, "labels": labels, "samples": samples}


def export(checkpoint: Path, encoded: dict, model_cfg: ModelConfig, head: HeadConfig, out_dir: Path) -> dict[str, str]:
    """Files a served classifier needs: weights, config.json (architecture, head, labels), tokenizer.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "task": "classification",
        "model": model_cfg.model_dump(mode="json"),
        "vocab_size": encoded["vocab_size"],
        "head": head.model_dump(mode="json"),
        "labels": encoded["labels"],
        "max_tokens": encoded["inputs"]["max_tokens"],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "weights": str(Path(checkpoint) / "model.safetensors"),
        "config": str(out_dir / "config.json"),
        "tokenizer": str(Path(encoded["path"]) / "tokenizer.json"),
    }


def load_package(files: dict[str, str | Path]) -> tuple[Classifier, object, dict]:
    """(classifier, tokenizer, config) from exported files; refuses files from different runs."""
    model_cfg, config = read_package_config(Path(files["config"]))
    head = HeadConfig.model_validate(config["head"])
    model = build_classifier(model_cfg, config["vocab_size"], head, len(config["labels"]))
    load_weights(Path(files["weights"]), model)
    tok = load_tokenizer(Path(files["tokenizer"]))
    if tok.vocab_size != config["vocab_size"]:
        raise ValueError(
            f"tokenizer.json has {tok.vocab_size} ids but the model was built for {config['vocab_size']}: "
            "the package mixes files from different runs"
        )
    return model.eval(), tok, config


def evaluate_files(files: dict, dataset_path: Path, *, batch_size: int = 32, device="cpu", autocast_dtype=None) -> dict:
    """A packaged classifier's validation metrics on another dataset, tokenized with its own tokenizer.
    When the dataset's classes are not the package's, the metrics are NaN: there is nothing to compare."""
    model, tok, config = load_package(files)
    manifest = json.loads((Path(dataset_path) / "manifest.json").read_text())
    names = config["labels"]
    if list(manifest["labels"]) != list(names):
        return {"val_loss_per_example": math.nan, "val_label_accuracy": math.nan, "val_macro_f1": math.nan}
    examples = encode_examples(tok, read_examples(Path(dataset_path), "val"), config["max_tokens"])
    probs, loss = predict(
        model.to(device), examples, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype
    )
    matrix = confusion_matrix(examples.labels, probs.argmax(1), len(names))
    return {"val_loss_per_example": loss} | scores(matrix, names, "val")
