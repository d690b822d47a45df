"""A language model's batches: windows of a flat token array, and its periodic validation estimate.

``TokenBatches`` is the ``lm.training.TaskData`` of language models; classifiers bring their own
(``lm.classification.batches``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lm.config import BatchSettings
from lm.evaluation import mean_loss
from lm.runtime import Runtime, TrainingError


@dataclass(frozen=True)
class TokenBatches:
    """A split's token array: random windows or contiguous streams of it, and the mean loss of its prefix."""

    tokens: np.ndarray

    def sampler(self, batches: BatchSettings, *, seed: int, context_length: int) -> BatchSampler:
        kind = StreamSampler if batches.batching == "streams" else BatchSampler
        sampler = kind(self.tokens, context_length=context_length, batch_size=batches.batch_size, seed=seed)
        sampler.tokens_per_batch = batches.batch_size * context_length
        return sampler

    def estimate(self, model: nn.Module, *, batch_size: int, max_tokens: int, runtime: Runtime) -> float:
        """The mean loss over the first ``max_tokens`` tokens."""
        loss, _ = mean_loss(
            model,
            self.tokens,
            context_length=model.context_length,
            batch_size=batch_size,
            device=runtime.device,
            autocast_dtype=runtime.amp_dtype,
            max_tokens=max_tokens,
        )
        return loss


class BatchSampler:
    """Random windows of ``context_length + 1`` tokens from a flat token array, seeded.

    ``next()`` → (window, continues): ``continues`` says whether row b follows on from row b of the
    previous window (never, here), i.e. whether a recurrent state may be carried into it.
    """

    def __init__(self, tokens: np.ndarray, *, context_length: int, batch_size: int, seed: int):
        if tokens.size < context_length + 2:
            raise TrainingError(
                f"training split has {tokens.size} tokens, fewer than context_length + 2 "
                f"({context_length + 2}); use more data or a shorter context_length"
            )
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # windows drawn so far
        self.rows = slice(None)  # this process's rows of each batch (all, unless data-parallel)

    def _window(self, starts: list[int]) -> torch.Tensor:
        window = np.stack([self.tokens[s : s + self.context_length + 1] for s in starts[self.rows]])
        return torch.from_numpy(window.astype(np.int64))

    def next(self) -> tuple[torch.Tensor, bool]:
        """(batch_size, context_length + 1) int64 — inputs are [:, :-1], targets [:, 1:] — and False."""
        high = self.tokens.size - self.context_length - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        self.position += 1
        return self._window(starts), False


class StreamSampler(BatchSampler):
    """The split cut into ``batch_size`` contiguous streams, read one window after another.

    Row b of each window continues row b of the previous one, so a recurrent model can carry its state
    across windows (truncated back-propagation through time). Each pass over the streams starts at a
    seeded offset below ``context_length`` so window boundaries move between epochs. The position is
    just the number of windows drawn, which makes resuming exact.
    """

    def __init__(self, tokens: np.ndarray, *, context_length: int, batch_size: int, seed: int):
        super().__init__(tokens, context_length=context_length, batch_size=batch_size, seed=seed)
        T = context_length
        self.stream_length = (tokens.size - T - 1) // batch_size // T * T  # whole windows, room for an offset
        if self.stream_length < T:
            raise TrainingError(
                f"training split has {tokens.size} tokens, too few for {batch_size} streams of at least one "
                f"window of {T} (+ offset); use batching: random, a smaller batch_size or more data"
            )
        self.windows = self.stream_length // T
        self.seed = seed

    def next(self) -> tuple[torch.Tensor, bool]:
        epoch, index = divmod(self.position, self.windows)
        offset = int(np.random.default_rng([self.seed, epoch]).integers(self.context_length))
        starts = [offset + b * self.stream_length + index * self.context_length for b in range(self.batch_size)]
        self.position += 1
        return self._window(starts), index > 0
