"""The one model interface that training, evaluation and generation rely on."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn
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


def architecture(model: nn.Module) -> str:
    """The model's layers in order on one line — ``Embedding(10000, 256) → LSTM(256, 512) → Linear(512, 10000)``
    — dropout and identity left out, a stack of blocks counted (``4 × Block``)."""
    parts = []
    for child in model.children():
        if isinstance(child, (nn.Dropout, nn.Identity)):
            continue
        if isinstance(child, nn.ModuleList):
            parts.append(f"{len(child)} × {type(child[0]).__name__}" if len(child) else "")
        else:
            parts.append(_layer(child))
    return " → ".join(p for p in parts if p)


def _layer(m: nn.Module) -> str:
    if isinstance(m, nn.Embedding):
        return f"Embedding({m.num_embeddings}, {m.embedding_dim})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features})"
    if isinstance(m, nn.LSTM):
        layers = f", num_layers={m.num_layers}" if m.num_layers > 1 else ""
        return f"LSTM({m.input_size}, {m.hidden_size}{layers})"
    if isinstance(m, nn.LayerNorm):
        return f"LayerNorm({m.normalized_shape[0]})"
    return type(m).__name__
