"""The shipped `seed-word-lstm` pipeline is the founding document's word-level LSTM, module for module."""

from pathlib import Path

import torch
from torch import nn

from flows.config import ConfigError, load_pipelines, parse_pipelines
from lm.config import WordTokenizerConfig
from lm.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def test_seed_word_lstm_is_embedding_lstm_linear():
    spec = load_pipelines(ROOT / "pipelines.yaml").get("seed-word-lstm")
    assert spec.tokenizer == WordTokenizerConfig(kind="word", vocab_size=10000, lowercase=True)
    model = build_model(spec.model, spec.tokenizer.vocab_size)
    assert repr(model.embedding) == "Embedding(10000, 256)"
    assert repr(model.lstm) == "LSTM(256, 512, batch_first=True)"
    assert isinstance(model.projection, nn.Identity)  # untied, hidden 512: the LSTM feeds the output directly
    assert repr(model.head) == "Linear(in_features=512, out_features=10000, bias=True)"
    assert [name for name, m in model.named_children() if any(True for _ in m.parameters())] == [
        "embedding",
        "lstm",
        "head",
    ]
    reference = [nn.Embedding(10000, 256), nn.LSTM(256, 512), nn.Linear(512, 10000)]
    expected = sum(p.numel() for m in reference for p in m.parameters())
    assert model.num_parameters() == expected == 10000 * 256 + 4 * 512 * (256 + 512 + 2) + 512 * 10000 + 10000
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 10000)


def test_a_word_vocabulary_of_one_is_reported_by_its_path():
    text = "default: a\npipelines:\n  a:\n    tokenizer: {kind: word, vocab_size: 1}\n"
    try:
        parse_pipelines(text, "p.yaml")
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError("a vocabulary of 1 was accepted")
    assert "pipelines.a.tokenizer.vocab_size:" in message and "must be at least 2" in message, message
