"""Tokenized labelled examples as arrays, the batches the training loop feeds a classifier, and their sampler.

``Examples``: ``ids`` (N, L) right-padded with 0, ``lengths`` (N,), ``labels`` (N,). Saved as safetensors
(plain tensors, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.numpy import load_file, save_file


@dataclass(frozen=True)
class Examples:
    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: np.ndarray) -> LabelledBatch:
        """Rows ``index`` as tensors, trimmed to the longest of them."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        return LabelledBatch(
            torch.from_numpy(self.ids[index, :width].astype(np.int64)),
            torch.from_numpy(lengths.astype(np.int64)),
            torch.from_numpy(self.labels[index].astype(np.int64)),
        )

    def save(self, path: Path) -> None:
        save_file({"ids": self.ids, "lengths": self.lengths, "labels": self.labels}, str(path))

    @classmethod
    def load(cls, path: Path) -> Examples:
        arrays = load_file(str(path))
        return cls(arrays["ids"], arrays["lengths"], arrays["labels"])


def encode_examples(tok, rows: list[dict], max_tokens: int) -> Examples:
    """Tokenize ``{"text", "label"}`` rows, truncate to ``max_tokens`` and right-pad with id 0."""
    encoded = [(tok.encode(r["text"]) or [0])[:max_tokens] for r in rows]
    width = max((len(e) for e in encoded), default=1)
    ids = np.zeros((len(rows), width), dtype=np.int32)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = e
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    labels = np.array([r["label"] for r in rows], dtype=np.int64)
    return Examples(ids, lengths, labels)


class LabelledBatch(NamedTuple):
    """(B, T) token ids, (B,) lengths, (B,) labels — moved to a device together."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> LabelledBatch:
        return LabelledBatch(*(t.to(device) for t in self))


class ExampleSampler:
    """Shuffled batches of whole examples: each epoch a seeded permutation, read in order.

    Like the token samplers, its state is the number of batches drawn (``position``), so resuming is
    exact; ``next()`` → (batch, False) since no recurrent state carries between examples.
    """

    def __init__(self, examples: Examples, *, batch_size: int, seed: int):
        if len(examples) < 1:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed = examples, min(batch_size, len(examples)), seed
        self.batches = len(examples) // self.batch_size  # the last partial batch of an epoch is dropped
        self.generator = torch.Generator().manual_seed(seed)  # for the interface (checkpointed RNG state)
        self.position = 0
        self.tokens_per_batch = self.batch_size * int(np.mean(examples.lengths))
        self.rows = slice(None)  # this process's rows of each batch (all, unless data-parallel)

    def next(self) -> tuple[LabelledBatch, bool]:
        epoch, index = divmod(self.position, self.batches)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        self.position += 1
        return self.examples.batch(order[index * self.batch_size : (index + 1) * self.batch_size][self.rows]), False
