"""lm/results.py: typed stage results, JSON in and out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lm.results import Corpus, Trained


def test_a_trained_record_from_before_typed_results_validates_with_its_card():
    old = {"checkpoint": "/w/final", "steps": 30, "train_loss": 2.5, "wall_seconds": 3.0, "tokens_per_second": 9.0,
           "best_step": None, "stopped_early": False, "objective": "causal", "num_parameters": 1234}  # fmt: skip
    trained = Trained.model_validate(old)
    assert trained.steps == 30 and trained.card == {"objective": "causal", "num_parameters": 1234}
    assert Trained.model_validate_json(trained.model_dump_json()) == trained


def test_results_are_frozen_and_refuse_unknown_fields():
    corpus = Corpus(path="/c", digest="d", cached=False, key="k", inputs={}, documents=1, chars={"train": 5})
    with pytest.raises(ValidationError):
        corpus.digest = "other"
    with pytest.raises(ValidationError):
        Corpus.model_validate(corpus.model_dump() | {"surprise": 1})
