"""The one model interface that training, evaluation and generation rely on."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch.nn import functional as F


class LMOutput(NamedTuple):
    """logits: (B, T, vocab_size); state: whatever the model carries between calls (or None)."""

    logits: torch.Tensor
    state: Any = None


@runtime_checkable
class LanguageModel(Protocol):
    """``model(tokens, state=None) → LMOutput``; ``encode(tokens) → hidden`` for task heads."""

    context_length: int
    vocab_size: int
    objective: str  # "causal" (predict the next token) or "mlm" (predict masked tokens)
    max_length: int | None  # the longest input ``encode`` accepts (None: any)
    unused_parameters: bool  # some parameters get no gradient in training (DDP must look for them)

    def __call__(self, tokens: torch.Tensor, state: Any = None) -> LMOutput: ...

    def encode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    # Causal models also decode incrementally — ``decode(tokens, state) → LMOutput(logits, new state)``,
    # the state being a KV cache (GPT) or the recurrent state (LSTM) — and say how many tokens that
    # state may hold (``decode_limit``: None for unlimited).

    def score(self, window: torch.Tensor, state: Any = None, generator: torch.Generator | None = None) -> tuple:
        """Training/evaluation loss on a (B, T + 1) token window: (nll sum, targets scored, new state)."""
        ...

    def num_parameters(self, *, non_embedding: bool = False) -> int: ...

    def layers(self) -> list[list[torch.nn.Parameter]]:
        """The parameters by depth, [embeddings, layer 1, …, layer N], for heads that freeze the first few."""
        ...

    def flops_per_token(self) -> float: ...


def causal_score(model, window: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, int, Any]:
    """Next-token cross-entropy summed over a (B, T + 1) window, the number of targets, the new state."""
    out = model(window[:, :-1], state=state)  # logits (B, T, V)
    nll = F.cross_entropy(out.logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
    return nll, window[:, 1:].numel(), out.state
