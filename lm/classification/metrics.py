"""Classification metrics as pure functions: predictions, loss, confusion matrix, precision/recall/F1."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

from lm.classification.examples import Examples


@torch.no_grad()
def predict(
    model,
    examples: Examples,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_examples: int | None = None,
) -> tuple[np.ndarray, float]:
    """Class probabilities (N, K) for the first ``max_examples`` examples (all by default), in order, and
    their mean unweighted cross-entropy (nats per example)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    n = len(examples) if max_examples is None else min(len(examples), max_examples)
    order = np.argsort(examples.lengths[:n], kind="stable")  # similar lengths together: less padding
    probs = np.zeros((n, model.num_classes), dtype=np.float64)
    total = 0.0
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        batch = examples.batch(index).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
            logits = model(batch.ids, batch.lengths).float()
        total += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        probs[index] = torch.softmax(logits, dim=-1).double().cpu().numpy()
    model.train(was_training)
    return probs, total / max(1, n)


def validation_loss(model, examples: Examples, **options) -> tuple[float, int]:
    """Mean cross-entropy over (a prefix of) the examples and how many were scored: the loop's estimate."""
    probs, loss = predict(model, examples, **options)
    return loss, len(probs)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def scores(matrix: np.ndarray, labels: list[str], prefix: str = "val") -> dict[str, float]:
    """Label accuracy, macro-F1, macro precision/recall and per-class precision/recall/F1 (0 when undefined);
    names as in ``lm.metrics`` (``label_accuracy``: a language model's ``accuracy`` is of next tokens)."""
    tp = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(0).astype(float), matrix.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    out = {
        f"{prefix}_label_accuracy": float(tp.sum() / max(1, matrix.sum())),
        f"{prefix}_macro_f1": float(f1.mean()),
        f"{prefix}_macro_precision": float(precision.mean()),
        f"{prefix}_macro_recall": float(recall.mean()),
    }
    for i, name in enumerate(labels):
        out |= {
            f"{prefix}_precision_{name}": float(precision[i]),
            f"{prefix}_recall_{name}": float(recall[i]),
            f"{prefix}_f1_{name}": float(f1[i]),
        }
    return out


def majority_baseline(train_labels: np.ndarray, truth: np.ndarray, labels: list[str], prefix: str) -> dict:
    """Label accuracy and macro-F1 of always predicting the most frequent training class."""
    majority = int(np.bincount(train_labels, minlength=len(labels)).argmax())
    matrix = confusion_matrix(truth, np.full_like(truth, majority), len(labels))
    s = scores(matrix, labels, prefix)
    return {
        f"{prefix}_baseline_label_accuracy": s[f"{prefix}_label_accuracy"],
        f"{prefix}_baseline_macro_f1": s[f"{prefix}_macro_f1"],
    }
