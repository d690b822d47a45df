"""Tokenized (source, target) pairs as arrays, the batches the training loop feeds a seq2seq model, their
sampler and the periodic validation estimate.

``Pairs``: ``source`` (N, S) and ``target`` (N, T) ids right-padded with 0, with their true lengths. The special
ids — the separator that ends the source (and starts the decoder) and the end of the target — are the model's
business (``lm.seq2seq.model``), not stored here. Saved as safetensors (plain tensors, no pickle).

``PairBatches`` is the ``lm.training.TaskData`` of seq2seq models.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from lm.config import BatchSettings
from lm.runtime import Runtime


@dataclass(frozen=True)
class Pairs:
    source: np.ndarray
    source_lengths: np.ndarray
    target: np.ndarray
    target_lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.source_lengths.shape[0])

    def batch(self, index: np.ndarray) -> PairBatch:
        """Rows ``index`` as tensors, each side trimmed to its longest row."""
        s, t = self.source_lengths[index], self.target_lengths[index]
        return PairBatch(
            torch.from_numpy(self.source[index, : max(1, int(s.max()))].astype(np.int64)),
            torch.from_numpy(s.astype(np.int64)),
            torch.from_numpy(self.target[index, : max(1, int(t.max()))].astype(np.int64)),
            torch.from_numpy(t.astype(np.int64)),
        )

    def row(self, i: int) -> tuple[list[int], list[int]]:
        """Pair ``i``'s (source ids, target ids) without padding."""
        return (
            self.source[i, : self.source_lengths[i]].astype(np.int64).tolist(),
            self.target[i, : self.target_lengths[i]].astype(np.int64).tolist(),
        )

    def save(self, path: Path) -> None:
        save_file(
            {"source": self.source, "source_lengths": self.source_lengths, "target": self.target,
             "target_lengths": self.target_lengths},
            str(path),
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Pairs:
        a = load_file(str(path))
        return cls(a["source"], a["source_lengths"], a["target"], a["target_lengths"])


@dataclass(frozen=True)
class Truncation:
    """How many pairs of a split lost tokens to the length limits, per side."""

    source: int = 0
    target: int = 0


def encode_pairs(tok, rows: list[dict], *, max_source: int, max_target: int, total: int | None = None
                 ) -> tuple[Pairs, Truncation]:  # fmt: skip
    """Tokenize ``{"source", "target"}`` rows; keep the first ``max_target`` target tokens and the first source
    tokens (a function's signature, a question's start) up to ``max_source`` and, when ``total`` is given (a
    decoder's context), up to what ``source <sep> target <eos>`` leaves. Counts the pairs cut on each side."""
    sources = [tok.encode(r["source"]) or [0] for r in rows]
    targets = [tok.encode(r["target"]) or [0] for r in rows]
    cut_target = sum(len(t) > max_target for t in targets)
    targets = [t[:max_target] for t in targets]
    room = [max_source if total is None else max(1, min(max_source, total - 2 - len(t))) for t in targets]
    cut = Truncation(sum(len(s) > r for s, r in zip(sources, room, strict=True)), cut_target)
    sources = [s[:r] for s, r in zip(sources, room, strict=True)]

    def padded(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(seqs), max((len(s) for s in seqs), default=1)), dtype=np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        return ids, np.array([len(s) for s in seqs], dtype=np.int64)

    return Pairs(*padded(sources), *padded(targets)), cut


class PairBatch(NamedTuple):
    """(B, S) source ids, (B,) source lengths, (B, T) target ids, (B,) target lengths."""

    source: torch.Tensor
    source_lengths: torch.Tensor
    target: torch.Tensor
    target_lengths: torch.Tensor

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in self))


class PairSampler:
    """Shuffled batches of whole pairs: each epoch a seeded permutation, read in order. Its state is the number
    of batches drawn (``position``), so resuming is exact; ``next()`` → (batch, False)."""

    def __init__(self, pairs: Pairs, *, batch_size: int, seed: int):
        if len(pairs) < 1:
            raise ValueError("no training pairs")
        self.pairs, self.batch_size, self.seed = pairs, min(batch_size, len(pairs)), seed
        self.batches = len(pairs) // self.batch_size  # the last partial batch of an epoch is dropped
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0
        self.tokens_per_batch = self.batch_size * int(np.mean(pairs.source_lengths + pairs.target_lengths + 2))
        self.rows = slice(None)

    def next(self) -> tuple[PairBatch, bool]:
        epoch, index = divmod(self.position, self.batches)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        self.position += 1
        return self.pairs.batch(order[index * self.batch_size : (index + 1) * self.batch_size][self.rows]), False


@torch.no_grad()
def target_loss(model: nn.Module, pairs: Pairs, *, batch_size: int = 32, device="cpu", autocast_dtype=None,
                max_pairs: int | None = None) -> tuple[float, int]:  # fmt: skip
    """Cross-entropy per target token (the end-of-target token included) over the first ``max_pairs`` pairs, and
    the number of target tokens scored."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    n = len(pairs) if max_pairs is None else min(len(pairs), max_pairs)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = pairs.batch(np.arange(start, min(n, start + batch_size))).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
            nll, scored, _ = model.score(batch)
        total, count = total + float(nll), count + int(scored)
    model.train(was_training)
    return total / max(1, count), count


@dataclass(frozen=True)
class PairBatches:
    pairs: Pairs

    def sampler(self, batches: BatchSettings, *, seed: int, context_length: int) -> PairSampler:
        """Whole pairs, ``batch_size`` at a time (lengths were fitted to the model when the pairs were encoded)."""
        return PairSampler(self.pairs, batch_size=batches.batch_size, seed=seed)

    def estimate(self, model: nn.Module, *, batch_size: int, max_tokens: int, runtime: Runtime) -> float:
        """The loss per target token over as many leading pairs as ``max_tokens`` tokens' worth of them."""
        per_pair = max(1, int(np.mean(self.pairs.source_lengths + self.pairs.target_lengths)))
        return target_loss(
            model, self.pairs, batch_size=batch_size, device=runtime.device, autocast_dtype=runtime.amp_dtype,
            max_pairs=max(1, max_tokens // per_pair),
        )[0]  # fmt: skip
