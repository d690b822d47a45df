"""The one table of metric names: each name has one unit and one meaning in every task that logs it.

A name is never reused with another unit (a classifier's loss per example is not a language model's loss
per token), so a column of `lmp compare`, a row of a run summary or a promotion gate reads one unit.
Evaluation metrics come in ``val_`` and ``test_`` twins (the same unit on the test split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TASKS = {"causal": "language-model", "mlm": "encoder", "classification": "classifier", "seq2seq": "seq2seq"}
"""Task key → its name in `lmp compare` (a causal language model, a masked-LM encoder, a classifier, a
sequence-to-sequence model: translation, summarization, question answering)."""

CAUSAL, MLM, CLASSIFICATION, SEQ2SEQ = ("causal",), ("mlm",), ("classification",), ("seq2seq",)
TRAINED = ("causal", "mlm", "classification", "seq2seq")


@dataclass(frozen=True)
class Metric:
    label: str
    """Short human name (run summaries)."""
    unit: str
    """What one unit of the value is (empty for a plain ratio)."""
    better: Literal["min", "max"] | None
    """Which way is better (`--sort`, promotion gates); None when neither is."""
    tasks: tuple[str, ...]
    """Tasks (keys of TASKS) that log it."""
    description: str


_ROUGE = "F1 × 100 (rouge-score)"
_COPY = "the source copied as the output"
_FREQUENT = "always the most frequent training answer"

_SPLIT = {  # name without its split prefix → metric; logged as val_<name> and test_<name>
    "bpc": Metric("bits per char", "bits/char", "min", CAUSAL, "cross-entropy in bits per character of text"),
    "loss": Metric("loss", "nats/token", "min", CAUSAL, "next-token cross-entropy, mean over predicted tokens"),
    "perplexity": Metric("perplexity", "exp(nats/token)", "min", CAUSAL, "exp of the next-token loss"),
    "accuracy": Metric("next-token accuracy", "fraction of tokens", "max", CAUSAL, "argmax = next token"),
    "tokens": Metric("tokens scored", "tokens", None, CAUSAL, "tokens predicted by the evaluation"),
    "oov_rate": Metric(
        "out-of-vocabulary rate",
        "fraction of tokens",
        None,
        CAUSAL,
        "tokens that are a word tokenizer's <unk> (predicting <unk> is cheap: bits per character read lower)",
    ),
    "mlm_loss": Metric("masked-token loss", "nats/masked token", "min", MLM, "cross-entropy at masked positions"),
    "mlm_perplexity": Metric("masked-token perplexity", "exp(nats/masked token)", "min", MLM, "exp of mlm_loss"),
    "mlm_targets": Metric("masked tokens scored", "tokens", None, MLM, "masked positions scored"),
    "macro_f1": Metric("macro-F1", "mean F1 over classes", "max", CLASSIFICATION, "unweighted mean of per-class F1"),
    "label_accuracy": Metric("label accuracy", "fraction of examples", "max", CLASSIFICATION, "predicted = true label"),
    "loss_per_example": Metric(
        "loss per example", "nats/example", "min", CLASSIFICATION, "cross-entropy of the label, mean over examples"
    ),
    "macro_precision": Metric("macro precision", "mean over classes", "max", CLASSIFICATION, "unweighted mean"),
    "macro_recall": Metric("macro recall", "mean over classes", "max", CLASSIFICATION, "unweighted mean"),
    "baseline_macro_f1": Metric(
        "majority-class macro-F1", "mean F1 over classes", "max", CLASSIFICATION, "always the most frequent class"
    ),
    "baseline_label_accuracy": Metric(
        "majority-class label accuracy", "fraction of examples", "max", CLASSIFICATION, "always the most frequent class"
    ),
    # seq2seq: decoded outputs scored 0–100 by the field's own libraries, and the teacher-forced target loss
    "bleu": Metric("BLEU", "BLEU (0–100, sacrebleu)", "max", SEQ2SEQ, "corpus BLEU, one reference (translation)"),
    "chrf": Metric("chrF", "chrF (0–100, sacrebleu)", "max", SEQ2SEQ, "corpus chrF, one reference (translation)"),
    "rouge1": Metric("ROUGE-1 F1", _ROUGE, "max", SEQ2SEQ, "unigram F1, stemmed, mean over pairs (summarization)"),
    "rouge2": Metric("ROUGE-2 F1", _ROUGE, "max", SEQ2SEQ, "bigram F1, stemmed, mean over pairs (summarization)"),
    "rougeL": Metric("ROUGE-L F1", _ROUGE, "max", SEQ2SEQ, "longest-common-subsequence F1, stemmed (summarization)"),
    "exact_match": Metric(
        "exact match", "% of answers (SQuAD normalisation)", "max", SEQ2SEQ, "normalised answer = reference (QA)"
    ),
    "token_f1": Metric("token F1", "F1 × 100 (SQuAD)", "max", SEQ2SEQ, "token-overlap F1, mean over answers (QA)"),
    "target_loss": Metric(
        "target-token loss",
        "nats/target token",
        "min",
        SEQ2SEQ,
        "cross-entropy on target tokens only, the source being context (teacher forcing)",
    ),
    "target_perplexity": Metric(
        "target-token perplexity", "exp(nats/target token)", "min", SEQ2SEQ, "exp of target_loss"
    ),
    "target_tokens": Metric("target tokens scored", "tokens", None, SEQ2SEQ, "target tokens scored by target_loss"),
    "baseline_bleu": Metric("copy-source BLEU", "BLEU (0–100, sacrebleu)", "max", SEQ2SEQ, _COPY),
    "baseline_chrf": Metric("copy-source chrF", "chrF (0–100, sacrebleu)", "max", SEQ2SEQ, _COPY),
    "baseline_rouge1": Metric("copy-source ROUGE-1 F1", _ROUGE, "max", SEQ2SEQ, _COPY),
    "baseline_rouge2": Metric("copy-source ROUGE-2 F1", _ROUGE, "max", SEQ2SEQ, _COPY),
    "baseline_rougeL": Metric("copy-source ROUGE-L F1", _ROUGE, "max", SEQ2SEQ, _COPY),
    "baseline_exact_match": Metric(
        "most-frequent-answer exact match", "% of answers (SQuAD normalisation)", "max", SEQ2SEQ, _FREQUENT
    ),
    "baseline_token_f1": Metric("most-frequent-answer token F1", "F1 × 100 (SQuAD)", "max", SEQ2SEQ, _FREQUENT),
}

METRICS: dict[str, Metric] = {f"{split}_{name}": m for name, m in _SPLIT.items() for split in ("val", "test")} | {
    "train_loss": Metric(
        "training loss",
        "nats per predicted unit of the task",
        "min",
        TRAINED,
        "the training objective: per token (language model), per masked token (encoder), per example "
        "(classifier), per target token (seq2seq) — compare it within one task only",
    ),
    "val_loss_estimate": Metric(
        "validation loss (estimate)",
        "nats per predicted unit of the task",
        "min",
        TRAINED,
        "the training loop's periodic estimate of the objective on the first eval_tokens of validation",
    ),
    "tokens_per_second": Metric("training speed", "tokens/s", "max", TRAINED, "training tokens per second"),
    "wall_seconds": Metric("training time", "s", "min", TRAINED, "training wall time"),
}
"""Every metric `lmp compare`, the run summary and the promotion gate know, by its logged name."""

PER_TASK_OBJECTIVE = ("train_loss", "val_loss_estimate")
"""Names whose unit depends on the task (the training loop's own objective): sorted within one task only."""

HEADLINE = {"causal": "val_bpc", "mlm": "val_mlm_loss", "classification": "val_macro_f1", "seq2seq": "val_chrf"}
"""Each task's headline metric (the default promotion gate; first in summaries)."""

APPLICATION_HEADLINE = {
    "translation": "val_chrf",
    "summarization": "val_rougeL",
    "question-answering": "val_exact_match",
}
"""A seq2seq pipeline's headline metric (its default gate) by application."""

GATE_METRICS = {
    "causal": ("val_bpc", "val_loss", "val_perplexity"),
    "mlm": ("val_mlm_loss", "val_mlm_perplexity"),
    "classification": ("val_macro_f1", "val_label_accuracy", "val_loss_per_example"),
    "seq2seq": (
        "val_chrf",
        "val_rougeL",
        "val_exact_match",
        "val_bleu",
        "val_rouge1",
        "val_rouge2",
        "val_token_f1",
        "val_target_loss",
        "val_target_perplexity",
    ),
}
"""The metrics a promotion gate (`promote.metric`) may compare, per task, the default first; `promote.mode`
is the table's ``better``."""

RENAMED = {  # classifier names before metric names were unique → today's name (runs logged before the rename)
    f"{split}_{old}": f"{split}_{new}"
    for split in ("val", "test")
    for old, new in (("loss", "loss_per_example"), ("accuracy", "label_accuracy"),
                     ("baseline_accuracy", "baseline_label_accuracy"))
}  # fmt: skip


def metric(name: str) -> Metric | None:
    """The table's entry for ``name`` (None for names outside it, e.g. per-class scores)."""
    return METRICS.get(name)


def for_task(task: str, split: str = "val") -> tuple[str, ...]:
    """The ``split`` metrics a task logs, its headline first."""
    names = [
        n
        for n, m in METRICS.items()
        if n.startswith(f"{split}_") and task in m.tasks and m.better and n not in PER_TASK_OBJECTIVE
    ]
    return tuple(sorted(names, key=lambda n: n != HEADLINE.get(task)))


def describe(name: str) -> str:
    """``val_bpc: bits/char, lower is better (language model)`` — one line for footnotes and errors."""
    m = METRICS[name]
    direction = {"min": ", lower is better", "max": ", higher is better", None: ""}[m.better]
    tasks = ", ".join(TASKS[t] for t in m.tasks)
    return f"{name}: {m.unit}{direction} ({tasks})"
