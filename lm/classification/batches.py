"""A classifier's batches: shuffled labelled examples, and their periodic validation estimate.

``ExampleBatches`` is the ``lm.training.TaskData`` of classifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from lm.classification.examples import Examples, ExampleSampler
from lm.classification.metrics import validation_loss
from lm.config import BatchSettings
from lm.runtime import Runtime


@dataclass(frozen=True)
class ExampleBatches:
    examples: Examples

    def sampler(self, batches: BatchSettings, *, seed: int, context_length: int) -> ExampleSampler:
        """Whole examples, ``batch_size`` at a time (``context_length`` is the backbone's business)."""
        return ExampleSampler(self.examples, batch_size=batches.batch_size, seed=seed)

    def estimate(self, model: nn.Module, *, batch_size: int, max_tokens: int, runtime: Runtime) -> float:
        """The mean cross-entropy over as many leading examples as ``max_tokens`` tokens' worth of them."""
        per_example = max(1, int(np.mean(self.examples.lengths)))
        return validation_loss(
            model,
            self.examples,
            batch_size=batch_size,
            device=runtime.device,
            autocast_dtype=runtime.amp_dtype,
            max_examples=max(1, max_tokens // per_example),
        )[0]
