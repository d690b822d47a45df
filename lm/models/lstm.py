"""LSTM language model: embedding → multi-layer ``nn.LSTM`` → projection → (tied) output.

``forward(tokens, state)`` returns the new ``(h, c)`` state, so evaluation and generation can carry it
from one window to the next instead of starting every window cold.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lm.config import LSTMConfig
from lm.models.base import LMOutput, causal_score


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class LSTMLM(nn.Module):
    """``forward(tokens (B, T), state=None) → LMOutput(logits (B, T, V), (h, c) each (L, B, H))``."""

    objective = "causal"

    def __init__(self, cfg: LSTMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.embed_dim,
            cfg.hidden_dim,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        out_dim = cfg.embed_dim if cfg.tie_weights else cfg.hidden_dim
        self.projection = nn.Linear(cfg.hidden_dim, out_dim) if out_dim != cfg.hidden_dim else nn.Identity()
        self.head = nn.Linear(out_dim, vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    max_length = None  # ``encode`` reads any length: the state carries
    unused_parameters = False  # every parameter gets a gradient from the LM objective

    def layers(self) -> list[list[nn.Parameter]]:
        """The parameters by depth: [embedding, layer 1, …, layer N] (what a task head freezes)."""
        layers = [[self.embedding.weight]]  # the LSTM's parameters are named weight_ih_l{k}, bias_hh_l{k}, …
        for k in range(self.cfg.num_layers):
            layers.append(
                [p for name, p in self.lstm.named_parameters() if name.split("_l")[-1].split("_")[0] == str(k)]
            )
        return layers

    def encode(self, tokens: torch.Tensor, state: tuple | None = None) -> torch.Tensor:
        """tokens (B, T) → top-layer hidden states (B, T, H)."""
        hidden, _ = self._recur(self.dropout(self.embedding(tokens)), state)
        return hidden

    def _recur(self, x: torch.Tensor, state: tuple | None):
        """The LSTM over ``x`` (B, T, E). oneDNN has no bf16 LSTM kernel on CPUs without native bf16 (AVX2
        only): there, under bf16 autocast, the recurrence runs in fp32 and the linear layers stay in bf16."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not _cpu_has_native_bf16():
            with torch.autocast("cpu", enabled=False):
                state = tuple(s.float() for s in state) if state is not None else None
                return self.lstm(x.float(), state)
        return self.lstm(x, state)

    def forward(self, tokens: torch.Tensor, state: tuple | None = None) -> LMOutput:
        hidden, state = self._recur(self.dropout(self.embedding(tokens)), state)  # (B, T, H)
        logits = self.head(self.projection(self.dropout(hidden)))  # (B, T, V)
        return LMOutput(logits, state)

    decode_limit = None  # the carried state has no length limit

    def decode(self, tokens: torch.Tensor, state: tuple | None = None) -> LMOutput:
        """Incremental decoding: the recurrent state is the decoding state."""
        return self(tokens, state)

    def score(self, window: torch.Tensor, state: tuple | None = None, generator: torch.Generator | None = None):
        """Next-token loss over a (B, T + 1) window, carrying ``state``: (nll sum, tokens scored, state)."""
        return causal_score(self, window, state)

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token ≈ 6·N (no attention term), N counting the output matrix once."""
        return 6.0 * (self.num_parameters(non_embedding=True) + self.vocab_size * self.head.in_features)
