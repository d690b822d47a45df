"""Loss, perplexity and bits per character: pure functions over a model and a token array.

Protocol: the whole split, in order, cut into non-overlapping windows of ``context_length`` tokens
(the last one may be shorter); each window predicts its own next tokens with no context carried in.
The same protocol serves every architecture, so the numbers are comparable.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

PROTOCOL = "full split, non-overlapping windows of context_length, in order"


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    context_length: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over ``tokens`` and the number of tokens predicted."""
    data = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens)
    if data.size < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {data.size}")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    starts = list(range(0, data.size - 1, context_length))
    total, count = 0.0, 0
    full = [s for s in starts if s + context_length + 1 <= data.size]
    tail = [s for s in starts if s + context_length + 1 > data.size]
    for group in [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]:
        length = min(context_length, data.size - 1 - group[0])
        window = np.stack([data[s : s + length + 1] for s in group]).astype(np.int64)
        batch = torch.from_numpy(window).to(device)  # (B, length + 1)
        with amp:
            logits = model(batch[:, :-1]).logits  # (B, length, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count, count


def bits_per_char(nats_per_token: float, tokens: int, chars: int) -> float:
    """Convert nats/token to bits/char given how many characters the tokens cover."""
    return nats_per_token * tokens / chars / math.log(2)


def lm_metrics(nats_per_token: float, tokens: int, chars: int, prefix: str = "val") -> dict[str, float]:
    """loss (nats/token), perplexity and bits per character under a common prefix."""
    return {
        f"{prefix}_loss": nats_per_token,
        f"{prefix}_perplexity": math.exp(min(nats_per_token, 50.0)),
        f"{prefix}_bpc": bits_per_char(nats_per_token, tokens, chars),
    }
