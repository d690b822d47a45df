"""lm/package.py: the one export, find, vocabulary check and load of a trained model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_model

from lm import package
from lm.classification.config import HeadConfig
from lm.classification.model import build_classifier
from lm.config import GPTConfig
from lm.errors import DataError
from lm.models import build_model
from lm.tokenizers import CharTokenizer

CFG = GPTConfig(num_layers=1, num_heads=2, embed_dim=16, context_length=16)


def _language_model(tmp_path, text="abcdefgh ROMEO:\n"):
    tok = CharTokenizer.train(text)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(CFG, tok.vocab_size)
    save_model(model, str(tmp_path / "model.safetensors"))
    config = {"model": CFG.model_dump(mode="json"), "vocab_size": tok.vocab_size}
    return package.export(tmp_path / "export", weights=tmp_path / "model.safetensors",
                          tokenizer=tmp_path / "tokenizer.json", config=config), model  # fmt: skip


def test_a_language_model_package_loads_with_the_same_weights(tmp_path):
    exported, model = _language_model(tmp_path)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["vocab_size"] == 16
    loaded = package.load(exported)
    assert not loaded.model.training and loaded.tokenizer.vocab_size == 16
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert package.task_name(loaded.config) == "language-model"  # no task key: a language model (old packages)


def test_a_classifier_package_loads_through_its_task(tmp_path):
    tok = CharTokenizer.train("abcdefgh")
    tok.save(tmp_path / "tokenizer.json")
    head = HeadConfig(pooling="mean")
    model = build_classifier(CFG, tok.vocab_size, head, 2)
    save_model(model, str(tmp_path / "model.safetensors"))
    config = {"task": "classification", "model": CFG.model_dump(mode="json"), "vocab_size": tok.vocab_size,
              "head": head.model_dump(mode="json"), "labels": ["a", "b"], "max_tokens": 8}  # fmt: skip
    exported = package.export(tmp_path / "x", weights=tmp_path / "model.safetensors",
                              tokenizer=tmp_path / "tokenizer.json", config=config)  # fmt: skip
    loaded = package.load(exported)
    assert loaded.model.objective == "classification" and loaded.config["labels"] == ["a", "b"]


def test_a_tokenizer_from_another_run_is_refused_naming_both_sizes(tmp_path):
    exported, _ = _language_model(tmp_path)
    CharTokenizer.train("xyz").save(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer.json has 4 ids but the model was built for 16"):
        package.load(exported)


def test_find_looks_anywhere_under_a_download_and_says_none_when_a_file_is_missing(tmp_path):
    exported, _ = _language_model(tmp_path)
    found = package.find(tmp_path)
    assert found is not None and found.config == exported.config
    (tmp_path / "tokenizer.json").unlink()
    assert package.find(tmp_path) is None
