"""Classifiers on every backbone: head shapes, padding, windows, freezing, labelled data and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.classification import stages
from lm.classification.batches import ExampleBatches
from lm.classification.config import HeadConfig, LabelledFiles, LabelledHub, ShakespeareGenre
from lm.classification.examples import Examples
from lm.classification.metrics import confusion_matrix, majority_baseline, scores
from lm.classification.model import build_classifier, resolve_class_weights
from lm.config import CharTokenizerConfig, EncoderConfig, GPTConfig, LSTMConfig, TrainConfig
from lm.errors import DataError
from lm.tokenizers import CharTokenizer, tokenizer_digest
from lm.training import train

BACKBONES = {
    "gpt": GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=8),
    "rotary": GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=8, positions="rotary"),
    "encoder": EncoderConfig(kind="encoder", num_layers=2, num_heads=2, embed_dim=16, context_length=8),
    "lstm": LSTMConfig(kind="lstm", num_layers=2, embed_dim=8, hidden_dim=12, context_length=8),
}


def classifier(kind: str, pooling: str = "mean", **head):
    torch.manual_seed(0)
    return build_classifier(BACKBONES[kind], 11, HeadConfig(pooling=pooling, dropout=0.0, **head), 3).eval()


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("length", [5, 8, 21])  # shorter than, equal to, and longer than the context (windows)
def test_head_shapes_and_padding_never_counts(kind, length):
    for pooling in ("mean", "last") + (("cls",) if kind == "encoder" else ()):
        model = classifier(kind, pooling)
        ids = torch.randint(1, 11, (1, length))
        alone = model(ids, torch.tensor([length]))
        assert alone.shape == (1, 3)
        padded = torch.cat([ids, torch.zeros(1, 30 - length, dtype=torch.long)], dim=1)
        other = torch.randint(1, 11, (1, 30))
        batch = model(torch.cat([padded, other]), torch.tensor([length, 30]))
        assert batch.shape == (2, 3)
        torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-4)  # padding changes nothing


def test_cls_pooling_is_refused_for_causal_backbones():
    with pytest.raises(ValueError, match="cls"):
        classifier("gpt", "cls")


def _examples(n: int = 64, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    ids = rng.integers(1, 11, (n, 12)).astype(np.int32)
    ids[:, 0] = labels + 1  # learnable: the first token says the class
    return Examples(ids, np.full(n, 12, dtype=np.int64), labels.astype(np.int64))


@pytest.mark.parametrize("kind", ["gpt", "encoder", "lstm"])
def test_frozen_layers_do_not_change_and_the_rest_trains(kind):
    model = classifier(kind, freeze_layers=1)
    layers = model.backbone_layers()
    before = [[p.detach().clone() for p in group] for group in layers]
    head_before = model.head.weight.detach().clone()
    cfg = TrainConfig(max_steps=6, batch_size=8, learning_rate=1e-2, warmup_steps=0, eval_interval=6, eval_tokens=64)
    train(
        model.train(),
        ExampleBatches(_examples()),
        ExampleBatches(_examples(16, 1)),
        cfg,
        on_metrics=lambda step, metrics: None,
    )
    for group, old in zip(layers[:2], before[:2], strict=True):  # embeddings and layer 1
        assert all(torch.equal(p, q) for p, q in zip(group, old, strict=True))
        assert all(not p.requires_grad for p in group)
    assert any(not torch.equal(p, q) for p, q in zip(layers[2], before[2], strict=True))  # layer 2 trained
    assert not torch.equal(model.head.weight, head_before)


def test_freezing_more_layers_than_exist_is_an_error():
    with pytest.raises(ValueError, match="freeze_layers is 3"):
        classifier("gpt", freeze_layers=3)


def test_training_learns_a_learnable_task_and_resumes_exactly(tmp_path):
    from lm.classification.metrics import predict
    from lm.training import TrainingInterrupted

    cfg = TrainConfig(
        max_steps=80, batch_size=16, learning_rate=1e-2, warmup_steps=0, eval_interval=20, eval_tokens=256,
        checkpoint_interval=20,
    )  # fmt: skip
    data, val = ExampleBatches(_examples(256)), ExampleBatches(_examples(64, 1))
    whole = classifier("gpt").train()
    train(whole, data, val, cfg, on_metrics=lambda s, m: None, checkpoint_dir=tmp_path / "whole")
    stopped = classifier("gpt").train()
    steps = iter(range(1, 100))
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(stopped, data, val, cfg, on_metrics=lambda s, m: None, checkpoint_dir=tmp_path / "parts",
              should_stop=lambda: next(steps) == 20)  # fmt: skip
    resumed = classifier("gpt").train()
    train(resumed, data, val, cfg, on_metrics=lambda s, m: None, checkpoint_dir=tmp_path / "parts",
          resume_from=interrupted.value.checkpoint)  # fmt: skip
    for p, q in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    probs, _ = predict(whole, val.examples)
    assert (probs.argmax(1) == val.examples.labels).mean() > 0.9


def test_metrics_and_baseline():
    truth, predicted = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = scores(matrix, ["a", "b", "c"])
    assert s["val_label_accuracy"] == pytest.approx(4 / 6)
    assert s["val_precision_b"] == pytest.approx(2 / 3) and s["val_recall_c"] == pytest.approx(0.5)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert s["val_macro_f1"] == pytest.approx(np.mean(f1))
    base = majority_baseline(np.array([1, 1, 0]), truth, ["a", "b", "c"], "val")
    assert base["val_baseline_label_accuracy"] == pytest.approx(2 / 6)
    assert base["val_baseline_macro_f1"] == pytest.approx((2 * (1 / 3) / (1 / 3 + 1)) / 3)


def test_balanced_class_weights():
    weights = resolve_class_weights("balanced", ["a", "b"], {"a": 30, "b": 10})
    assert weights == pytest.approx([40 / 60, 40 / 20])
    assert resolve_class_weights({"b": 3.0}, ["a", "b"], {}) == [1.0, 3.0]
    with pytest.raises(ValueError, match="not classes"):
        resolve_class_weights({"c": 1.0}, ["a", "b"], {})


# ---------------------------------------------------------------- labelled data


def _csv(path: Path, rows: list[tuple[str, object]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)


ROWS = [(f"good film number {i}", "positive") for i in range(12)] + [(f"bad film {i}", "negative") for i in range(12)]


def test_files_source_splits_by_label_and_names_classes(tmp_path):
    _csv(tmp_path / "all.csv", ROWS)
    cfg = LabelledFiles(source="files", paths=("all.csv",), text_column="review", label_column="sentiment")
    dataset = stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)
    assert dataset.labels == ["negative", "positive"]
    assert dataset.class_counts["val"] == {"negative": 2, "positive": 2}  # 20 % of each class, stratified
    again = stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)
    assert again.cached and again.digest == dataset.digest


def test_a_validation_label_unseen_in_training_is_a_clear_error(tmp_path):
    _csv(tmp_path / "train.csv", ROWS)
    _csv(tmp_path / "val.csv", [("fine film", "positive"), ("so-so film", "neutral")])
    cfg = LabelledFiles(
        source="files", paths=("train.csv",), validation_paths=("val.csv",), text_column="review",
        label_column="sentiment", labels=("negative", "neutral", "positive"),
    )  # fmt: skip
    with pytest.raises(DataError, match=r"validation example 1: label 'neutral' never occurs in the training data"):
        stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)
    unknown = cfg.model_copy(update={"labels": None})
    with pytest.raises(DataError, match=r"label 'neutral' is not one of the classes \['negative', 'positive'\]"):
        stages.prepare(unknown, tmp_path / "out", base_dir=tmp_path)


def test_missing_columns_and_labels_name_the_file(tmp_path):
    _csv(tmp_path / "a.csv", ROWS)
    cfg = LabelledFiles(source="files", paths=("a.csv",))
    with pytest.raises(DataError, match=r"a.csv: no column 'text'; the columns are \['review', 'sentiment'\]"):
        stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)


def test_hub_source_reads_a_saved_dataset_with_class_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    train_rows = {"text": [t for t, _ in ROWS], "label": [int(label == "positive") for _, label in ROWS]}
    test_rows = {"text": ["great", "awful"], "label": [1, 0]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train_rows, features),
            "test": datasets.Dataset.from_dict(test_rows, features),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    cfg = LabelledHub(source="hub", dataset=str(tmp_path / "saved"), validation_split="test")
    dataset = stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)
    assert dataset.labels == ["neg", "pos"] and dataset.examples == {"train": 24, "val": 2}
    rows = [json.loads(line) for line in (Path(dataset.path) / "val.jsonl").read_text().splitlines()]
    assert rows == [{"text": "great", "label": 1}, {"text": "awful", "label": 0}]


def test_genre_task_never_puts_a_play_in_two_splits(tmp_path):
    cfg = ShakespeareGenre(source="shakespeare-genre", max_passages_per_play=5, lines_per_passage=3, test_fraction=0.2)
    dataset = stages.prepare(cfg, tmp_path, base_dir=tmp_path)
    plays = dataset.plays
    assert not (set(plays["train"]) & set(plays["val"])) and not (set(plays["val"]) & set(plays["test"]))
    assert len(plays["train"]) + len(plays["val"]) + len(plays["test"]) == 38
    assert dataset.labels == ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
    assert all(n > 0 for n in dataset.class_counts["val"].values())  # every genre in validation


def test_the_tokenizer_comes_from_the_initialising_model(tmp_path):
    _csv(tmp_path / "a.csv", ROWS)
    cfg = LabelledFiles(source="files", paths=("a.csv",), text_column="review", label_column="sentiment")
    dataset = stages.prepare(cfg, tmp_path / "out", base_dir=tmp_path)
    pretrained = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))  # knows no digits: they map to id 0
    pretrained.save(tmp_path / "tokenizer.json")
    encoded = stages.encode(dataset, tmp_path / "tokenizer.json", tmp_path / "tokens", max_tokens=32)
    assert encoded.tokenizer_digest == tokenizer_digest(pretrained) and encoded.vocab_size == 28
    assert (Path(encoded.path) / "tokenizer.json").read_text() == pretrained.to_json()
    ids = stages.load_split(encoded, "train")
    assert ids.ids[0, : ids.lengths[0]].tolist() == pretrained.encode(
        json.loads((Path(dataset.path) / "train.jsonl").read_text().splitlines()[0])["text"]
    )
    fresh = stages.encode(dataset, CharTokenizerConfig(), tmp_path / "tokens", max_tokens=32)
    assert fresh.tokenizer_digest != encoded.tokenizer_digest  # trained here: has the digits
