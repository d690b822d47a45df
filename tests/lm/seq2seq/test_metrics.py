"""Seq2seq metrics against sacrebleu and rouge-score called directly, and SQuAD v1.1 worked by hand."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lm.seq2seq import metrics

HYPS = ["the cat sat on a mat .", "a dog barked loudly at night", "it rains in Paris today"]
REFS = ["the cat sat on the mat .", "the dog barked all night", "today it is raining in Paris"]


def test_translation_matches_sacrebleu_called_directly():
    scores, signatures = metrics.translation(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert "tok:13a" in signatures["bleu"] and "nrefs:1" in signatures["bleu"]
    assert signatures["chrf"].startswith("nrefs:1") and f"version:{sacrebleu.__version__}" in signatures["chrf"]


def test_translation_perfect_and_empty():
    perfect, _ = metrics.translation(REFS, REFS)
    assert perfect == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    empty, _ = metrics.translation([""], ["the cat sat on the mat"])
    assert empty == {"bleu": 0.0, "chrf": 0.0}


def test_translation_to_chinese_uses_the_zh_tokenizer():
    hyps, refs = ["猫坐在垫子上。"], ["猫坐在一张垫子上。"]
    scores, signatures = metrics.translation(hyps, refs, target_lang="zh")
    assert "tok:zh" in signatures["bleu"]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    # 13a leaves the line one word, so the partial match would score 0
    assert scores["bleu"] > 0
    assert sacrebleu.corpus_bleu(hyps, [refs]).score == 0
    assert "tok:13a" in metrics.translation(hyps, refs, target_lang="fr")[1]["bleu"]


def test_summarization_matches_rouge_score_mean_of_pairs():
    scores, signatures = metrics.summarization(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert scores[name] == pytest.approx(100 * sum(p[name].fmeasure for p in pairs) / len(pairs))
    assert scores["rouge1"] > scores["rouge2"] > 0
    assert signatures == {"rouge": "rouge-score 0.1.2|use_stemmer=True|default tokenizer|mean of per-pair F1"}


def test_summarization_perfect_empty_and_stemming():
    assert metrics.summarization(REFS, REFS)[0] == {k: pytest.approx(100.0) for k in ("rouge1", "rouge2", "rougeL")}
    assert metrics.summarization([""], ["a summary"])[0] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # the Porter stemmer makes "raining" and "rains" one token
    assert metrics.summarization(["it rains"], ["it raining"])[0]["rouge1"] == pytest.approx(100.0)


def test_rouge_score_tokenizer_keeps_ascii_letters_only():
    # documented limitation of rouge-score's default tokenizer: "très" → "tr", "s"; Chinese → no tokens
    assert metrics.summarization(["très"], ["tr s"])[0]["rouge1"] == pytest.approx(100.0)
    assert metrics.summarization(["猫坐在垫子上"], ["猫坐在垫子上"])[0]["rouge1"] == 0.0


def test_squad_normalisation_and_scores_by_hand():
    assert metrics.normalize_answer("The  Cat!") == "cat"
    assert metrics.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    scores, signatures = metrics.question_answering(["The  Cat!"], ["cat"])
    assert scores == {"exact_match": 100.0, "token_f1": 100.0}
    assert signatures["squad"].startswith("SQuAD v1.1 normalisation|")
    # "quick brown fox" vs "quick fox jumps": 2 shared, P = R = 2/3
    partial, _ = metrics.question_answering(["the quick brown fox"], ["quick fox jumps"])
    assert partial["exact_match"] == 0.0
    assert partial["token_f1"] == pytest.approx(200 / 3)
    both, _ = metrics.question_answering(["The  Cat!", "the quick brown fox", "dog"], ["cat", "quick fox jumps", "x"])
    assert both["exact_match"] == pytest.approx(100 / 3)
    assert both["token_f1"] == pytest.approx((100 + 200 / 3 + 0) / 3)


def test_squad_f1_repeated_tokens_and_empty_answers():
    # shared tokens are counted with multiplicity: "x b b" vs "b b c" → 2 shared of 3 each
    assert metrics.f1_score("x b b", "b b c") == pytest.approx(2 / 3)
    assert metrics.f1_score("b b b", "b") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # v1.1: F1 is 0 when nothing is shared, even two empty answers; exact match of two empty answers is 1
    assert metrics.f1_score("", "") == 0.0 and metrics.exact_match_score("the", "")
    assert metrics.question_answering([""], ["Paris"])[0] == {"exact_match": 0.0, "token_f1": 0.0}


def test_score_prefixes_metric_names_but_not_signature_families():
    scores, signatures = metrics.score("translation", HYPS, REFS, prefix="val")
    assert set(scores) == {"val_bleu", "val_chrf"} and set(signatures) == {"bleu", "chrf"}
    assert scores["val_chrf"] == metrics.translation(HYPS, REFS)[0]["chrf"]
    assert set(metrics.score("summarization", HYPS, REFS, prefix="test")[0]) == {
        "test_rouge1",
        "test_rouge2",
        "test_rougeL",
    }
    qa, qa_signatures = metrics.score("question-answering", HYPS, REFS, prefix="val")
    assert set(qa) == {"val_exact_match", "val_token_f1"} and set(qa_signatures) == {"squad"}
    zh = metrics.score("translation", ["猫"], ["猫"], prefix="val", target_lang="zh")[1]
    assert "tok:zh" in zh["bleu"]
    for application in metrics.APPLICATIONS:
        assert f"val_{metrics.HEADLINE[application]}" in metrics.score(application, HYPS, REFS, prefix="val")[0]


@pytest.mark.parametrize("application", metrics.APPLICATIONS)
def test_score_rejects_empty_and_mismatched_lists(application):
    with pytest.raises(ValueError, match=application):
        metrics.score(application, [], [], prefix="val")
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.score(application, ["a", "b"], ["a"], prefix="val")


def test_score_rejects_an_unknown_application():
    with pytest.raises(ValueError, match="unknown seq2seq application 'chat'"):
        metrics.score("chat", HYPS, REFS, prefix="val")


def test_most_frequent_breaks_ties_by_first_occurrence():
    assert metrics.most_frequent(["b", "a", "a", "b", "c"]) == "b"
    assert metrics.most_frequent(["c", "a", "b", "a"]) == "a"
    with pytest.raises(ValueError):
        metrics.most_frequent([])


def test_baselines():
    assert metrics.copy_source(["x", "y"]) == ["x", "y"]
    # copying an identical source scores 100
    identical = metrics.baseline("translation", REFS, REFS, [], prefix="val")
    assert identical == {"val_baseline_bleu": pytest.approx(100.0), "val_baseline_chrf": pytest.approx(100.0)}
    summary = metrics.baseline("summarization", HYPS, REFS, [], prefix="test")
    assert summary == {f"test_baseline_{k}": v for k, v in metrics.summarization(HYPS, REFS)[0].items()}
    # question answering: the most frequent training answer ("Paris", counted as written) for every question
    train = ["Rome", "Paris", "paris", "Paris"]
    qa = metrics.baseline("question-answering", ["q1", "q2"], ["Paris", "London"], train, prefix="val")
    assert qa == {"val_baseline_exact_match": 50.0, "val_baseline_token_f1": 50.0}
