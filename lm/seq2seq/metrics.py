"""Seq2seq metrics from the field's own libraries: BLEU and chrF (sacrebleu), ROUGE (rouge-score), SQuAD v1.1.

Every function takes decoded hypotheses and one reference per hypothesis, in order, and returns
``(metrics, signatures)``: scores on a 0–100 scale under the names of ``lm.metrics``, and for each metric
family a string that says how it was computed (sacrebleu's own signature for BLEU and chrF), so a number is
never quoted without the settings that make it comparable.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version

from lm.metrics import APPLICATION_HEADLINE

APPLICATIONS = tuple(APPLICATION_HEADLINE)

HEADLINE = {application: name.removeprefix("val_") for application, name in APPLICATION_HEADLINE.items()}
"""Each application's gate metric (unprefixed). The libraries are imported when a metric is computed: reading
pipelines.yaml imports none of them."""

Scores = tuple[dict[str, float], dict[str, str]]


def _check(application: str, hypotheses: list[str], references: list[str]) -> None:
    if not hypotheses or not references:
        raise ValueError(f"{application}: no hypotheses or no references to score (both must be non-empty)")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{application}: {len(hypotheses)} hypotheses but {len(references)} references "
            "(one reference per hypothesis, in order)"
        )


def translation(hypotheses: list[str], references: list[str], target_lang: str | None = None) -> Scores:
    """Corpus BLEU and chrF (sacrebleu defaults, one reference each); BLEU with sacrebleu's ``zh`` tokenizer
    when ``target_lang`` is ``"zh"`` (13a otherwise, whose whitespace split would make a Chinese line one word)."""
    _check("translation", hypotheses, references)
    from sacrebleu.metrics import BLEU, CHRF

    bleu = BLEU(tokenize="zh" if target_lang == "zh" else None)
    chrf = CHRF()
    metrics = {
        "bleu": float(bleu.corpus_score(hypotheses, [references]).score),
        "chrf": float(chrf.corpus_score(hypotheses, [references]).score),
    }
    return metrics, {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}


def summarization(hypotheses: list[str], references: list[str]) -> Scores:
    """ROUGE-1/2/L F-measure (rouge-score, Porter stemmer), the mean over pairs, × 100.

    rouge-score's default tokenizer keeps ``[a-z0-9]`` only: accented letters split words ("très" → "tr",
    "s") and a text without Latin letters or digits (Chinese) has no tokens and scores 0.
    """
    _check("summarization", hypotheses, references)
    names = ("rouge1", "rouge2", "rougeL")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    metrics = {name: 100.0 * total / len(hypotheses) for name, total in totals.items()}
    signature = f"rouge-score {version('rouge-score')}|use_stemmer=True|default tokenizer|mean of per-pair F1"
    return metrics, {"rouge": signature}


# normalize_answer, f1_score and exact_match_score below are the official SQuAD v1.1 evaluation script's
# (evaluate-v1.1.py), kept as written there (including F1 = 0 when nothing is shared, even for two empty
# answers); the script's max over several ground truths is not needed with one reference per hypothesis.
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def question_answering(hypotheses: list[str], references: list[str]) -> Scores:
    """SQuAD v1.1 exact match and token F1, means over pairs, × 100."""
    _check("question-answering", hypotheses, references)
    pairs = list(zip(hypotheses, references, strict=True))
    metrics = {
        "exact_match": 100.0 * sum(exact_match_score(h, r) for h, r in pairs) / len(pairs),
        "token_f1": 100.0 * sum(f1_score(h, r) for h, r in pairs) / len(pairs),
    }
    signature = (
        "SQuAD v1.1 normalisation|lower-case, strip ASCII punctuation, drop a/an/the, collapse whitespace"
        "|one reference|mean over pairs"
    )
    return metrics, {"squad": signature}


def score(
    application: str,
    hypotheses: list[str],
    references: list[str],
    *,
    prefix: str,
    target_lang: str | None = None,
) -> Scores:
    """The application's metrics as ``{prefix}_{name}`` (``val_chrf``) and their signatures keyed by metric
    family (``bleu``, ``chrf``, ``rouge``, ``squad``)."""
    scorers: dict[str, Callable[[list[str], list[str]], Scores]] = {
        "translation": lambda h, r: translation(h, r, target_lang=target_lang),
        "summarization": summarization,
        "question-answering": question_answering,
    }
    if application not in scorers:
        raise ValueError(f"unknown seq2seq application {application!r}: use one of {', '.join(APPLICATIONS)}")
    metrics, signatures = scorers[application](hypotheses, references)
    return {f"{prefix}_{name}": value for name, value in metrics.items()}, signatures


def copy_source(sources: list[str]) -> list[str]:
    """The hypotheses of the copy-the-source baseline: each source unchanged."""
    return list(sources)


def most_frequent(train_targets: list[str]) -> str:
    """The most frequent training answer (as written, not normalised); a tie goes to the one seen first."""
    if not train_targets:
        raise ValueError("most_frequent: no training targets to count")
    return Counter(train_targets).most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def baseline(
    application: str,
    sources: list[str],
    references: list[str],
    train_targets: list[str],
    *,
    prefix: str,
    target_lang: str | None = None,
) -> dict[str, float]:
    """The application's metrics of its baseline as ``{prefix}_baseline_{name}``: copy-the-source for
    translation and summarization, the most frequent training answer for question answering."""
    if application == "question-answering":
        hypotheses = [most_frequent(train_targets)] * len(references)
    else:
        hypotheses = copy_source(sources)
    metrics, _ = score(application, hypotheses, references, prefix=f"{prefix}_baseline", target_lang=target_lang)
    return metrics
