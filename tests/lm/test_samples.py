"""lm/samples.py: the generation card of a champion and a challenger, on tiny models built here."""

from __future__ import annotations

import math

import pytest
import torch

from lm.classification.config import HeadConfig
from lm.classification.model import build_classifier
from lm.config import EncoderConfig, GPTConfig, LSTMConfig
from lm.models import build_model
from lm.package import Loaded
from lm.samples import Prompt, Settings, distinct, mean_loss, repetition, side_by_side
from lm.seq2seq.model import build_seq2seq
from lm.tokenizers import CharTokenizer

TEXT = "abcdefgh ROMEO:\nJULIET<b>&'\"`"
PROMPTS = ["ROMEO:\n", "JULIET:\n", "ab"]
CFG = GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=16)


def _loaded(seed: int, cfg=CFG) -> Loaded:
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(seed)
    model = build_model(cfg, tok.vocab_size).eval()
    return Loaded(model, tok, {"model": cfg.model_dump(mode="json"), "vocab_size": tok.vocab_size})


def _degenerate(seed: int) -> Loaded:
    """A GPT whose output layer is pushed towards one token: it says "a" whatever it is asked."""
    loaded = _loaded(seed)
    favoured = loaded.tokenizer.encode("a")[0]
    loaded.model.lm_head.register_forward_hook(lambda module, args, out: out + 50.0 * (
        torch.arange(out.shape[-1]) == favoured))  # fmt: skip
    return loaded


def test_the_statistics_on_known_sequences():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([7] * 10) == pytest.approx(6 / 7)  # 7 four-grams, one of them new
    assert repetition([1, 2, 3]) == 0.0  # no 4-gram at all
    assert distinct([1, 1, 2, 2], 1) == 0.5 and distinct([1, 1, 2, 2], 2) == 1.0
    assert distinct([1], 2) == 0.0


def test_mean_loss_slides_past_the_context_like_one_window_within_it():
    loaded = _loaded(0)
    context, target = [1, 2, 3], [4, 5, 6, 7]  # within the 16-token window: one forward pass
    logits = loaded.model(torch.tensor([context + target[:-1]])).logits[0, len(context) - 1 :]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(target)).item()
    assert mean_loss(loaded.model, context, target) == pytest.approx(expected, rel=1e-5)
    long = mean_loss(loaded.model, context, [4, 5, 6, 7] * 10)  # 40 targets: windows of at most 16
    assert math.isfinite(long) and long > 0


@pytest.mark.parametrize("settings", [Settings(max_new_tokens=12), Settings(12, temperature=0.8, top_k=5, seed=3)])
def test_both_models_answer_every_prompt_with_their_statistics(settings):
    card = side_by_side(_loaded(0), _loaded(1), PROMPTS, settings, names=("smoke v1", "smoke v2"))
    assert [row.prompt.text for row in card.rows] == PROMPTS
    for row in card.rows:
        for out in (row.champion, row.challenger):
            assert out.tokens == 12 and out.chars == len(out.text) == 12  # characters: one token each
            assert 0 < out.distinct_1 <= 1 and 0 <= out.repetition < 1
            assert math.isfinite(out.other_loss) and out.other_loss > 0
            assert out.metric is None
        assert row.champion.text != row.challenger.text  # two different models
    markdown, page = card.to_markdown(), card.to_html()
    for row in card.rows:
        assert row.champion.text in markdown and row.challenger.text in markdown
    assert "smoke v1" in page and "| distinct-1 |" in markdown and "Δ (challenger − champion)" in page


def test_the_same_weights_give_the_same_outputs_and_zero_deltas():
    card = side_by_side(_loaded(0), _loaded(0), PROMPTS, Settings(20, temperature=1.0, seed=7))
    for row in card.rows:
        assert row.champion == row.challenger
    assert all(delta == 0 for _, _, delta in card.summary().values())
    assert set(card.summary()) == {"tokens", "chars", "distinct_1", "distinct_2", "repetition", "other_loss"}


def test_a_repeating_challenger_has_a_higher_repetition_rate():
    card = side_by_side(_loaded(0), _degenerate(1), PROMPTS, Settings(24, temperature=0.8, top_k=5))
    assert all(row.challenger.text == "a" * 24 for row in card.rows)
    champion, challenger, delta = card.summary()["repetition"]
    assert challenger == pytest.approx(20 / 21) and delta > 0.5 and challenger > champion
    assert card.summary()["distinct_1"][2] < 0  # fewer distinct tokens too


def test_model_text_is_escaped_in_the_page_and_fenced_in_the_markdown():
    tok = CharTokenizer.train(TEXT)
    loaded = _degenerate(0)
    lt = tok.encode("<")[0]
    loaded.model.lm_head.register_forward_hook(lambda m, a, out: out + 100.0 * (torch.arange(out.shape[-1]) == lt))
    card = side_by_side(_loaded(0), loaded, ["<script>alert(1)</script>```"], Settings(5))
    page = card.to_html()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;&lt;&lt;&lt;&lt;" in page and "<<<<<" not in page
    assert "````text\n<script>alert(1)</script>```\n````" in card.to_markdown()  # a longer fence than the text's


def test_an_lstm_champion_meets_a_gpt_challenger():
    lstm = _loaded(0, LSTMConfig(kind="lstm", num_layers=1, embed_dim=8, hidden_dim=16, context_length=16))
    card = side_by_side(lstm, _loaded(0), [Prompt("ROMEO:\n")], Settings(30))
    assert card.rows[0].champion.tokens == card.rows[0].challenger.tokens == 30
    assert math.isfinite(card.rows[0].champion.other_loss)


def test_a_classifier_has_no_card():
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = build_classifier(CFG, tok.vocab_size, HeadConfig(pooling="mean"), 2).eval()
    config = {"task": "classification", "model": CFG.model_dump(mode="json"), "vocab_size": tok.vocab_size}
    classifier = Loaded(model, tok, config)
    assert side_by_side(classifier, classifier, PROMPTS, Settings()) is None
    encoder_cfg = EncoderConfig(kind="encoder", num_layers=1, num_heads=2, embed_dim=16, context_length=16)
    encoder = Loaded(build_model(encoder_cfg, tok.vocab_size).eval(), tok, {"model": {}, "vocab_size": tok.vocab_size})
    assert side_by_side(encoder, encoder, PROMPTS, Settings()) is None  # a masked LM generates nothing
    assert side_by_side(_loaded(0), classifier, PROMPTS, Settings()) is None  # nothing to lay side by side


def _seq2seq(seed: int, application: str = "question-answering") -> Loaded:
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(seed)
    model = build_seq2seq("decoder", CFG, tok.vocab_size).eval()
    config = {"task": "seq2seq", "architecture": "decoder", "model": CFG.model_dump(mode="json"), "encoder": None,
              "vocab_size": tok.vocab_size, "application": application, "target_lang": None,
              "lengths": {"max_source": 8, "max_target": 6, "total": 16},
              "decode": {"num_beams": 2, "length_penalty": 1.0, "temperature": 0.0, "max_new_tokens": 6}}  # fmt: skip
    return Loaded(model, tok, config)


def test_seq2seq_models_transduce_each_source_and_are_scored_against_its_reference():
    pairs = [Prompt("ROMEO", reference="JULIET"), Prompt("abc", reference="abc")]
    card = side_by_side(_seq2seq(0), _seq2seq(1), pairs, Settings(64))
    for row in card.rows:
        for out in (row.champion, row.challenger):
            assert out.tokens <= 6 and 0 <= out.metric <= 1 and out.other_loss is None
    assert card.summary().keys() == {"tokens", "chars", "distinct_1", "distinct_2", "repetition", "metric"}
    assert "exact_match vs reference" in card.to_markdown() and "reference:" in card.to_markdown()
    same = side_by_side(_seq2seq(0), _seq2seq(0), pairs, Settings(64))
    assert all(row.champion == row.challenger for row in same.rows)
