"""The seq2seq task's checks of what it starts from, and its spec's validation (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import Seq2SeqSpec
from lm.errors import DataError
from lm.generation_params import GenerationParams
from lm.results import Init, Package
from lm.tasks.seq2seq import Seq2SeqTask, served_defaults
from lm.tokenizers import CharTokenizer

GPT = {"kind": "gpt", "num_layers": 1, "num_heads": 2, "embed_dim": 16, "context_length": 32}
ENCODER = GPT | {"kind": "encoder"}
LSTM = {"kind": "lstm", "num_layers": 1, "embed_dim": 16, "hidden_dim": 16}
DATA = {"source": "cldr-names", "target_lang": "fr"}


def _init(tmp_path: Path, name: str, model: dict, *, task: str | None = None, chars: str = "abc") -> Init:
    """A downloaded package as ``init_model`` returns it (only its config and tokenizer are read here)."""
    folder = tmp_path / name
    folder.mkdir()
    CharTokenizer.train(chars).save(folder / "tokenizer.json")
    config = {"model": model, "vocab_size": 4} | ({"task": task} if task else {})
    (folder / "config.json").write_text(json.dumps(config))
    package = Package(weights=str(folder / "model.safetensors"), config=str(folder / "config.json"),
                      tokenizer=str(folder / "tokenizer.json"))  # fmt: skip
    return Init(requested=f"models:/{name}@champion", uri=f"models:/{name}/1", name=name, version=1, run_id="r",
                weights_digest="0" * 64, package=package, model=model, vocab_size=4)  # fmt: skip


def _task(**spec) -> Seq2SeqTask:
    return Seq2SeqTask(Seq2SeqSpec.model_validate({"name": "t", "task": "seq2seq", "data": DATA} | spec))


def test_a_decoder_starts_from_a_gpt_or_an_lstm(tmp_path):
    task = _task(init_from="models:/g@champion")
    task.check_init(_init(tmp_path, "g", GPT))
    task.check_init(_init(tmp_path, "l", LSTM))


@pytest.mark.parametrize(
    ("model", "task_name", "message"),
    [
        (GPT, "classification", r"init_from models:/x@champion is a classification model; start from a registered "
                                r"language model"),
        (ENCODER, None, r"has model.kind encoder, not gpt or lstm: a masked-LM encoder cannot generate: use it as "
                        r"encoder_from"),
    ],
)  # fmt: skip
def test_a_classifier_or_an_encoder_is_refused_as_a_decoder(tmp_path, model, task_name, message):
    with pytest.raises(DataError, match=message):
        _task(init_from="models:/x@champion").check_init(_init(tmp_path, "x", model, task=task_name))


def test_an_encoder_decoder_needs_an_encoder_and_a_gpt_with_one_tokenizer(tmp_path):
    task = _task(architecture="encoder-decoder", init_from="models:/g@champion", encoder_from="models:/e@champion")
    gpt, encoder = _init(tmp_path, "g", GPT), _init(tmp_path, "e", ENCODER)
    task.check_init(gpt.model_copy(update={"parts": {"encoder": encoder}}))
    other = _init(tmp_path, "o", ENCODER, chars="xyz")
    with pytest.raises(DataError, match=r"models:/g@champion and encoder_from models:/o@champion have different "):
        task.check_init(gpt.model_copy(update={"parts": {"encoder": other}}))
    with pytest.raises(DataError, match=r"encoder_from models:/g2@champion has model.kind gpt, not encoder"):
        task.check_init(gpt.model_copy(update={"parts": {"encoder": _init(tmp_path, "g2", GPT)}}))
    with pytest.raises(DataError, match=r"init_from models:/l@champion has model.kind lstm, not gpt"):
        task.check_init(_init(tmp_path, "l", LSTM).model_copy(update={"parts": {"encoder": encoder}}))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"architecture": "encoder-decoder", "init_from": "models:/g@champion"}, "needs encoder_from"),
        ({"init_from": "models:/g@champion", "encoder_from": "models:/e@champion"}, "encoder_from is for"),
        ({"model": ENCODER}, "model.kind encoder cannot generate"),
        ({"architecture": "encoder-decoder", "model": LSTM}, "decoder is a gpt, not lstm"),
        ({"model": GPT, "encoder_from": "models:/e@champion"}, "encoder_from needs init_from"),
        ({"init_from": "models:/g@champion", "model": GPT}, "remove `model:` and `tokenizer:`"),
        ({"model": GPT, "promote": {"metric": "val_macro_f1"}}, "not reported for seq2seq"),
    ],
)
def test_the_spec_refuses_what_cannot_run(spec, message):
    with pytest.raises(ValidationError, match=message):
        _task(**spec)


@pytest.mark.parametrize(
    ("data", "gate"),
    [(DATA, "val_chrf"), ({"source": "python-docstrings"}, "val_rougeL"),
     ({"source": "shakespeare-speakers"}, "val_exact_match"),
     ({"source": "files", "paths": ["a.csv"], "application": "summarization"}, "val_rougeL")],
)  # fmt: skip
def test_the_gate_defaults_to_the_application_s_headline(data, gate):
    spec = _task(model=GPT, data=data).spec
    assert (spec.promote.metric, spec.promote.mode) == (gate, "max")


def test_served_params_default_to_how_the_model_was_evaluated():
    defaults = served_defaults({"max_new_tokens": 20, "temperature": 0.0, "num_beams": 4, "length_penalty": 0.6})
    parsed = GenerationParams.parse({"max_new_tokens": 5}, defaults=defaults)
    assert (parsed.max_new_tokens, parsed.num_beams, parsed.temperature, parsed.length_penalty) == (5, 4, 0.0, 0.6)
    assert set(defaults) == set(GenerationParams().as_dict())  # the served signature names every param
    with pytest.raises(ValueError, match="num_beams must be an integer from 1 to 16"):
        GenerationParams.parse({"num_beams": 17})


def test_the_target_language_reaches_the_metrics(tmp_path):
    """A Chinese target is encoded with its language, so BLEU later uses sacrebleu's zh tokenizer."""
    task = _task(model=GPT, data={"source": "cldr-names", "target_lang": "zh", "kinds": ["months", "days"]})
    encoded = task.encode(task.prepare(tmp_path / "pairs", base_dir=tmp_path), None, tmp_path / "tokens")
    assert encoded.target_lang == "zh" and encoded.unknown["train"] == 0.0
