"""The one model interface that training, evaluation and generation rely on."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


class LMOutput(NamedTuple):
    """logits: (B, T, vocab_size); state: whatever the model carries between calls (or None)."""

    logits: torch.Tensor
    state: Any = None


@runtime_checkable
class LanguageModel(Protocol):
    """``model(tokens, state=None) → LMOutput``; ``encode(tokens) → hidden`` for task heads."""

    context_length: int
    vocab_size: int

    def __call__(self, tokens: torch.Tensor, state: Any = None) -> LMOutput: ...

    def encode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def num_parameters(self, *, non_embedding: bool = False) -> int: ...

    def flops_per_token(self) -> float: ...
