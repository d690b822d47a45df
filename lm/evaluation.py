"""Loss, perplexity and bits per character: pure functions over a model and a token array.

Protocol: every token of the split after the first is predicted exactly once, in order. The split is
cut into ``batch_size`` contiguous streams read in windows of ``context_length`` tokens; a model that
returns a state (the LSTM) carries it from one window to the next within a stream, a model that does
not (the GPT) sees each window fresh — for it this is exactly non-overlapping windows. The few tokens
left after the streams (fewer than ``batch_size × context_length``) are read as one more stream.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

PROTOCOL = "full split in order; non-overlapping windows of context_length; recurrent state carried within streams"


@dataclass(frozen=True)
class SplitScore:
    loss: float
    """Mean nats per predicted token (per masked token for a masked-LM)."""
    count: int
    """Tokens predicted."""
    accuracy: float | None
    """Next-token accuracy (argmax = target) for a causal model; None for a masked-LM."""


def mean_loss(model: torch.nn.Module, tokens: np.ndarray, **options) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over ``tokens`` and the number of tokens predicted
    (``options`` as for ``score_split``)."""
    score = score_split(model, tokens, **options)
    return score.loss, score.count


@torch.no_grad()
def score_split(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    context_length: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
) -> SplitScore:
    """Loss, count and (for a causal model) next-token accuracy over ``tokens`` under the protocol above."""
    data = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens)
    if data.size < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {data.size}")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    causal = getattr(model, "objective", "causal") == "causal"
    n, T = data.size - 1, context_length
    streams = max(1, min(batch_size, n // T))
    length = (n // streams) // T * T  # whole windows per stream
    total, count, correct, state = 0.0, 0, 0, None
    generator = torch.Generator().manual_seed(0)  # masked-LM positions: the same every evaluation

    def score(starts: list[int], width: int, state):
        window = torch.from_numpy(np.stack([data[s : s + width + 1] for s in starts]).astype(np.int64)).to(device)
        with amp:
            if not causal:
                nll, scored, state = model.score(window, state, generator)  # (B, width + 1) window
                return nll.item(), scored, 0, state
            out = model(window[:, :-1], state=state)  # the causal objective, plus the argmax for accuracy
        logits, targets = out.logits.float().flatten(0, 1), window[:, 1:].flatten()
        nll = F.cross_entropy(logits, targets, reduction="sum")
        return nll.item(), targets.numel(), int((logits.argmax(-1) == targets).sum()), out.state

    for t in range(0, length, T):
        nll, c, right, state = score([b * length + t for b in range(streams)], T, state)
        total, count, correct = total + nll, count + c, correct + right
    state = None
    for s in range(streams * length, n, T):  # the remainder, as one more stream
        nll, c, right, state = score([s], min(T, n - s), state)
        total, count, correct = total + nll, count + c, correct + right
    model.train(was_training)
    return SplitScore(total / count, count, correct / count if causal else None)


def bits_per_char(nats_per_token: float, tokens: int, chars: int) -> float:
    """Convert nats/token to bits/char given how many characters the tokens cover."""
    return nats_per_token * tokens / chars / math.log(2)


def lm_metrics(nats_per_token: float, tokens: int, chars: int, prefix: str = "val") -> dict[str, float]:
    """loss (nats/token), perplexity and bits per character under a common prefix (names and units: the one
    table in ``lm.metrics``; no other task logs these names)."""
    return {
        f"{prefix}_loss": nats_per_token,
        f"{prefix}_perplexity": math.exp(min(nats_per_token, 50.0)),
        f"{prefix}_bpc": bits_per_char(nats_per_token, tokens, chars),
    }
