"""lm/export/onnx.py: every packaged architecture as an ONNX graph that ONNX Runtime runs like PyTorch."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer as HFTokenizer

from lm import package
from lm.classification.config import HeadConfig
from lm.classification.model import build_classifier
from lm.config import EncoderConfig, GPTConfig, LSTMConfig
from lm.errors import DataError
from lm.export import onnx as onnx_export
from lm.models import build_model
from lm.seq2seq.model import build_seq2seq
from lm.tokenizers import CharTokenizer

ort = pytest.importorskip("onnxruntime")  # the onnx extra (dev brings it)
pytest.importorskip("onnxscript")

TEXT = "to be, or not to be:\nthat is the question"
# One Transformer block (a dynamo export takes ~1 s more per block); two LSTM layers, so the state has a layer axis.
GPT = GPTConfig(num_layers=1, num_heads=2, embed_dim=16, context_length=12)
MODELS = {
    "gpt": GPT,
    "rotary": GPTConfig(num_layers=1, num_heads=2, embed_dim=16, context_length=12, positions="rotary"),
    "encoder": EncoderConfig(kind="encoder", num_layers=1, num_heads=2, embed_dim=16, context_length=12),
    "lstm": LSTMConfig(kind="lstm", num_layers=2, embed_dim=8, hidden_dim=12, context_length=12),
}
LABELS = ["comedy", "history", "tragedy"]


def _package(root, kind: str, *, classifier: bool = False) -> package.Loaded:
    """A tiny seeded model written and loaded as a task writes its package (weights, tokenizer, config.json)."""
    tok = CharTokenizer.train(TEXT)
    tok.save(root / "tokenizer.json")
    cfg = MODELS[kind]
    config = {"model": cfg.model_dump(mode="json"), "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    if classifier:
        head = HeadConfig(pooling="mean", dropout=0.0)
        model = build_classifier(cfg, tok.vocab_size, head, len(LABELS))
        config |= {"task": "classification", "head": head.model_dump(mode="json"), "labels": LABELS, "max_tokens": 12}
    else:
        model = build_model(cfg, tok.vocab_size)
    save_model(model, str(root / "model.safetensors"))
    exported = package.export(root / "package", weights=root / "model.safetensors",
                              tokenizer=root / "tokenizer.json", config=config)  # fmt: skip
    return package.load(exported)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each architecture exported once (checked by ``export_onnx`` itself): kind → (loaded, result)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            loaded = _package(root, kind.removesuffix("-classifier"), classifier=kind.endswith("-classifier"))
            cache[kind] = loaded, onnx_export.export_onnx(loaded, root / "onnx")
        return cache[kind]

    return get


def _run(result: dict, **inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(result["model"], providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in inputs.items()})


# A classifier on an LSTM goes through the fast TorchScript exporter; on a Transformer, through dynamo (~4 s more).
KINDS = ["gpt", "rotary", "encoder", "lstm-classifier", pytest.param("encoder-classifier", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runtime_gives_pytorch_logits_at_a_batch_and_length_not_exported(exported, kind):
    loaded, result = exported(kind)
    assert result["max_abs_difference"]["logits"] <= 1e-4
    assert result["exporter"] == ("torchscript" if kind.startswith("lstm") else "dynamo")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (4, 7), generator=g)  # exported at (3, 2)
    if kind.endswith("classifier"):
        lengths = torch.tensor([7, 3, 1, 5])
        with torch.no_grad():
            expected = loaded.model(ids, lengths)
        (got,) = _run(result, input_ids=ids, lengths=lengths)
        assert got.shape == (4, len(LABELS))
    else:
        with torch.no_grad():
            expected = loaded.model(ids).logits
        (got,) = _run(result, input_ids=ids)
        assert got.shape == (4, 7, loaded.tokenizer.vocab_size)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)

    meta = json.loads(open(result["metadata"]).read())
    assert meta["context_length"] == 12 and meta["opset"] == onnx_export.OPSET
    assert meta["max_sequence_length"] == (None if kind.startswith("lstm") else 12)  # an LSTM reads any length
    assert meta["model"] == loaded.config["model"] and meta["vocab_size"] == loaded.tokenizer.vocab_size
    assert meta["inputs"]["input_ids"] == {"dtype": "int64", "shape": ["batch", "sequence"]}
    assert meta.get("labels") == (LABELS if kind.endswith("classifier") else None)


@pytest.mark.parametrize("length", [1, 12])
def test_a_causal_graph_takes_one_token_up_to_the_full_context(exported, length):
    loaded, result = exported("gpt")  # exported at length 2, where attention's causal flag was fixed
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    np.testing.assert_allclose(_run(result, input_ids=ids)[0], expected.numpy(), atol=1e-4, rtol=0)


def test_the_lstm_state_carries_across_calls_like_one_pass_over_the_whole_sequence(exported):
    loaded, result = exported("lstm")
    assert result["exporter"] == "torchscript" and max(result["max_abs_difference"].values()) <= 1e-4
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    zeros = torch.zeros(2, 2, 12)
    with torch.no_grad():
        whole = loaded.model(ids)  # one pass from a zero state
    first = _run(result, input_ids=ids[:, :4], h0=zeros, c0=zeros)
    second = _run(result, input_ids=ids[:, 4:], h0=torch.from_numpy(first[1]), c0=torch.from_numpy(first[2]))
    np.testing.assert_allclose(np.concatenate([first[0], second[0]], axis=1), whole.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(second[1], whole.state[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(second[2], whole.state[1].numpy(), atol=1e-4)
    meta = json.loads(open(result["metadata"]).read())
    assert meta["carried"] == {"hn": "h0", "cn": "c0"} and meta["inputs"]["h0"]["shape"] == [2, "batch", 12]


def test_the_tokenizer_beside_the_graph_gives_our_ids(exported):
    loaded, result = exported("gpt")
    text = "that is the question? ¿unknown!"
    assert HFTokenizer.from_file(result["tokenizer"]).encode(text).ids == loaded.tokenizer.encode(text)


def test_a_missing_onnxruntime_names_the_extra_and_writes_nothing(tmp_path, monkeypatch):
    loaded = _package(tmp_path, "lstm")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(DataError, match=r'pip install -e "\.\[onnx\]"'):
        onnx_export.export_onnx(loaded, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_seq2seq_package_is_refused_pointing_at_its_decoder(tmp_path):
    tok = CharTokenizer.train(TEXT)
    config = {"task": "seq2seq", "architecture": "decoder", "model": GPT.model_dump(mode="json"),
              "vocab_size": tok.vocab_size}  # fmt: skip
    loaded = package.Loaded(build_seq2seq("decoder", GPT, tok.vocab_size).eval(), tok, config)
    with pytest.raises(DataError, match="seq2seq models is not supported.*decoder language model"):
        onnx_export.export_onnx(loaded, tmp_path / "onnx")


def test_an_unknown_model_is_refused_by_name(tmp_path):
    tok = CharTokenizer.train(TEXT)
    loaded = package.Loaded(torch.nn.Linear(2, 2), tok, {"model": {}, "vocab_size": tok.vocab_size})
    with pytest.raises(DataError, match="ONNX export of a Linear"):
        onnx_export.export_onnx(loaded, tmp_path / "onnx")


def test_a_graph_that_disagrees_is_a_bug_naming_the_difference_and_leaves_no_folder(tmp_path, monkeypatch):
    loaded = _package(tmp_path, "lstm")
    previous = tmp_path / "onnx"
    previous.mkdir()
    (previous / "model.onnx").write_text("an earlier export")
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # every difference is now too large
    with pytest.raises(RuntimeError, match=r"max \|difference\| \{'logits': .*'hn': .*'cn': .*exceeds -1\.0"):
        onnx_export.export_onnx(loaded, previous)
    assert [p.name for p in tmp_path.iterdir() if "onnx" in p.name] == ["onnx"]  # no temporary sibling
    assert [p.name for p in previous.iterdir()] == ["model.onnx"]
    assert (previous / "model.onnx").read_text() == "an earlier export"
