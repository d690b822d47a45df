"""A package as an ONNX graph: ``model.onnx`` (the forward pass, fp32, dynamic batch and sequence axes),
``tokenizer.json`` (HF format, for ``tokenizers.Tokenizer.from_file``) and ``onnx.json`` (what the graph takes
and gives), checked against PyTorch with ONNX Runtime before the folder is put in place.

Exporters (torch 2.13): the default ``dynamo=True`` exporter for Transformers (GPT, encoder and the
classifiers on them). A graph holding an ``nn.LSTM`` goes through the TorchScript exporter (``dynamo=False``,
``dynamic_axes``): ``torch.export`` specialises the LSTM's sequence length to the example's, so the dynamo graph
declares a fixed-length output. GPT attention passes ``is_causal`` as a plain bool so
that a symbolic sequence length exports (``T > 1`` holds for every traced length, and one token attends only to
itself either way).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lm import package
from lm.atomic import atomic_dir, atomic_write_bytes
from lm.classification.model import Classifier
from lm.errors import DataError
from lm.export import require, shareable
from lm.export.tokenizer import hf_tokenizer_json
from lm.models import gpt
from lm.models.encoder import Encoder
from lm.models.lstm import LSTMLM
from lm.seq2seq.model import Seq2Seq

OPSET = 18
TOLERANCE = 1e-4
"""Largest |ONNX Runtime − PyTorch| accepted on any output (fp32)."""
FILES = {"model": "model.onnx", "tokenizer": "tokenizer.json", "metadata": "onnx.json"}
INTEGER_INPUTS = ("input_ids", "lengths")  # int64; every other input and every output is float32
EXPORT_BATCH, CHECK_BATCH = 3, 2  # different, so the check proves the batch axis dynamic too
EXPORT_LENGTH = 2  # the check runs the longest sequence and one token less (dynamo specialises lengths 0 and 1)


@dataclass(frozen=True)
class Graph:
    """One architecture's forward as an exporter sees it: ``call(model, *inputs) → outputs``, tensors only, in
    the order ``inputs`` and ``outputs`` name them."""

    call: Callable[..., tuple]
    inputs: dict[str, tuple]
    """Input name → shape: sizes and the axis names ``batch`` / ``sequence``."""
    outputs: dict[str, tuple]
    max_length: int | None
    """Longest sequence the graph accepts (None: any)."""
    carried: dict[str, str] = field(default_factory=dict)
    """Output → the input it is fed back into on the next call (an LSTM's state)."""
    metadata: dict = field(default_factory=dict)
    """What ``onnx.json`` adds for this kind of model (a classifier's labels, an encoder's mask id)."""


def _logits(model: nn.Module, ids: torch.Tensor) -> tuple:
    return (model(ids).logits,)


def _recurrent(model: nn.Module, ids: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple:
    out = model(ids, (h0, c0))
    return out.logits, *out.state


def _classify(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> tuple:
    return (model(ids, lengths),)


def graph_of(loaded: package.Loaded) -> Graph:
    """The one dispatch over the packaged architectures."""
    model, task, ids = loaded.model, package.task_name(loaded.config), ("batch", "sequence")
    if isinstance(model, Seq2Seq):
        raise DataError(
            "ONNX export of seq2seq models is not supported (their decoding loop and KV cache are not one forward "
            "pass); export the decoder language model it was initialised from (its registered package) instead"
        )
    if isinstance(model, Classifier):
        return Graph(_classify, {"input_ids": ids, "lengths": ("batch",)}, {"logits": ("batch", model.num_classes)},
                     model.backbone.max_length, metadata={"labels": list(loaded.config["labels"])})  # fmt: skip
    if isinstance(model, LSTMLM):
        state = (model.cfg.num_layers, "batch", model.cfg.hidden_dim)
        return Graph(_recurrent, {"input_ids": ids, "h0": state, "c0": state},
                     {"logits": (*ids, model.vocab_size), "hn": state, "cn": state}, None,
                     carried={"hn": "h0", "cn": "c0"})  # fmt: skip
    if isinstance(model, gpt.Transformer):  # GPT and Encoder
        mask = {"mask_id": model.mask_id} if isinstance(model, Encoder) else {}
        return Graph(_logits, {"input_ids": ids}, {"logits": (*ids, model.vocab_size)}, model.max_length,
                     metadata=mask)  # fmt: skip
    raise DataError(f"ONNX export of a {type(model).__name__} ({task} package) is not supported")


def named_axes(shape: tuple) -> dict[int, str]:
    """The dynamic axes of a shape: position → name."""
    return {i: d for i, d in enumerate(shape) if isinstance(d, str)}


class _Forward(nn.Module):
    """The model (a submodule: its weights become the graph's initializers) called through ``Graph.call``."""

    def __init__(self, model: nn.Module, call: Callable[..., tuple]):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *inputs: torch.Tensor) -> tuple:
        return self.call(self.model, *inputs)


def sample(graph: Graph, vocab_size: int, batch: int, length: int, generator: torch.Generator) -> dict:
    """Random inputs of ``batch`` rows of ``length`` tokens (the first row full length, the others shorter)."""
    sizes = {"batch": batch, "sequence": length}
    inputs = {}
    for name, shape in graph.inputs.items():
        shape = tuple(sizes.get(d, d) for d in shape)
        if name == "input_ids":
            inputs[name] = torch.randint(0, vocab_size, shape, generator=generator)
        elif name == "lengths":
            inputs[name] = torch.cat([torch.tensor([length]), torch.randint(1, length + 1, (batch - 1,))])
        else:
            inputs[name] = torch.randn(shape, generator=generator)
    return inputs


@contextmanager
def _quiet_exporter():
    """The exporters' own log lines (e.g. that torchvision is not installed) are not the user's business."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export(graph: Graph, model: nn.Module, example: dict, path: Path) -> str:
    """Write ``model.onnx``; return the exporter used."""
    wrapped, args = _Forward(model, graph.call).eval(), tuple(example.values())
    names = {"input_names": list(graph.inputs), "output_names": list(graph.outputs), "opset_version": OPSET}
    if any(isinstance(m, nn.LSTM) for m in model.modules()):
        axes = {name: named_axes(shape) for name, shape in (graph.inputs | graph.outputs).items()}
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings: checked below
            torch.onnx.export(wrapped, args, str(path), dynamo=False, dynamic_axes=axes, **names)
        return "torchscript"
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=graph.max_length)}
    shapes = tuple({i: dims[d] for i, d in named_axes(shape).items()} for shape in graph.inputs.values())
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=(shapes,), verbose=False, **names)
    program.save(str(path), external_data=False)
    return "dynamo"


def verify(graph: Graph, model: nn.Module, path: Path, vocab_size: int, lengths: tuple[int, ...]) -> dict:
    """Run ``path`` with ONNX Runtime and the model in PyTorch on two batches of the given lengths, the second
    carrying the state the first returned (each side its own), and return each output's max |difference|."""
    ort = require("onnxruntime", "Checking an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, ours, theirs, worst = torch.Generator().manual_seed(0), {}, {}, dict.fromkeys(graph.outputs, 0.0)
    for length in lengths:
        inputs = sample(graph, vocab_size, CHECK_BATCH, length, generator)
        with torch.no_grad():
            expected = dict(zip(graph.outputs, graph.call(model, *(inputs | ours).values()), strict=True))
        feed = {name: t.numpy() for name, t in inputs.items()} | theirs
        got = dict(zip(graph.outputs, session.run(None, feed), strict=True))
        for name in graph.outputs:
            worst[name] = max(worst[name], float(np.abs(expected[name].numpy() - got[name]).max()))
        ours = {into: expected[name] for name, into in graph.carried.items()}
        theirs = {into: got[name] for name, into in graph.carried.items()}
    bad = {name: d for name, d in worst.items() if not d <= TOLERANCE}
    if bad:
        raise RuntimeError(
            f"the ONNX graph disagrees with PyTorch: max |difference| {bad} exceeds {TOLERANCE} "
            f"(lengths {lengths}); this is a bug in the export, not in the package"
        )
    return worst


def metadata(graph: Graph, loaded: package.Loaded, exporter: str, provenance: dict | None = None) -> dict:
    def described(tensors: dict) -> dict:
        return {n: {"dtype": "int64" if n in INTEGER_INPUTS else "float32", "shape": list(shape)}
                for n, shape in tensors.items()}  # fmt: skip

    return {
        "format": "onnx", "opset": OPSET, "exporter": exporter, "task": package.task_name(loaded.config),
        "inputs": described(graph.inputs), "outputs": described(graph.outputs), "carried": graph.carried,
        "max_sequence_length": graph.max_length, "context_length": loaded.model.context_length,
        "vocab_size": loaded.config["vocab_size"], "model": loaded.config["model"], "tokenizer": FILES["tokenizer"],
        "source": provenance or {}, **graph.metadata,
    }  # fmt: skip


def export_onnx(loaded: package.Loaded, out_dir: Path, *, check: bool = True, provenance: dict | None = None) -> dict:
    """Write ``model.onnx``, ``tokenizer.json`` and ``onnx.json`` into ``out_dir`` (replaced whole, or left as it
    was on failure); ``loaded.model`` is put in fp32 eval mode. With ``check``, ONNX Runtime must agree with PyTorch
    within ``TOLERANCE`` on batches of 2 at the longest sequence and one token less (exported at 3 × 2), else a
    RuntimeError. Returns the paths, the exporter and each output's max |difference| (empty without ``check``)."""
    graph = graph_of(loaded)
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        require(module, "ONNX export")
    model, vocab_size, out_dir = loaded.model.float().eval(), loaded.config["vocab_size"], Path(out_dir)
    longest = graph.max_length or loaded.model.context_length
    example = sample(graph, vocab_size, EXPORT_BATCH, EXPORT_LENGTH, torch.Generator().manual_seed(0))
    with atomic_dir(out_dir) as tmp:
        exporter = _export(graph, model, example, tmp / FILES["model"])
        lengths = (longest, max(1, longest - 1))
        differences = verify(graph, model, tmp / FILES["model"], vocab_size, lengths) if check else {}
        atomic_write_bytes(tmp / FILES["tokenizer"], hf_tokenizer_json(loaded.tokenizer).encode("utf-8"))
        text = json.dumps(metadata(graph, loaded, exporter, provenance), indent=2, ensure_ascii=False)
        atomic_write_bytes(tmp / FILES["metadata"], text.encode("utf-8"))
        shareable(tmp)
    paths = {key: str(out_dir / name) for key, name in FILES.items()}
    return paths | {"exporter": exporter, "max_abs_difference": differences}
