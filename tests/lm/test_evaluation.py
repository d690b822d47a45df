import math

import numpy as np
import pytest
import torch

from lm.evaluation import bits_per_char, lm_metrics, mean_loss
from lm.models import LMOutput
from lm.models.base import causal_score


class Uniform(torch.nn.Module):
    """Predicts every token with equal probability: loss is exactly ln(V)."""

    context_length = 8

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[tuple[int, ...]] = []

    def forward(self, tokens, state=None):
        self.calls.append(tuple(tokens.shape))
        return LMOutput(torch.zeros(*tokens.shape, self.vocab))

    def score(self, window, state=None, generator=None):
        return causal_score(self, window, state)


def test_uniform_model_scores_log_vocab_and_covers_every_token():
    model = Uniform(5)
    tokens = np.arange(30) % 5
    loss, count = mean_loss(model, tokens, context_length=8, batch_size=2)
    assert loss == pytest.approx(math.log(5))
    assert count == 29  # every token but the first is predicted exactly once
    assert model.calls == [(2, 8), (1, 8), (1, 5)]  # three full windows, then the short tail


def test_bits_per_char_for_char_and_subword_tokens():
    assert bits_per_char(math.log(2), tokens=10, chars=10) == pytest.approx(1.0)
    assert bits_per_char(math.log(2), tokens=10, chars=40) == pytest.approx(0.25)
    m = lm_metrics(math.log(4), 10, 10)
    assert m["val_perplexity"] == pytest.approx(4.0) and m["val_bpc"] == pytest.approx(2.0)


def test_too_short_input_is_an_error():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mean_loss(Uniform(3), np.array([1]), context_length=4)


class Copy(Uniform):
    """Predicts that the next token repeats the current one."""

    def forward(self, tokens, state=None):
        return LMOutput(torch.nn.functional.one_hot(tokens, self.vocab).float() * 10.0)


def test_next_token_accuracy_counts_argmax_hits():
    from lm.evaluation import score_split

    tokens = np.array([1, 1, 2, 2, 3, 3, 4, 4, 0, 0, 1, 1, 2])  # 12 predictions, 6 of them repeats
    score = score_split(Copy(5), tokens, context_length=4, batch_size=2)
    assert score.count == 12 and score.accuracy == pytest.approx(6 / 12)
