"""BERT-style bidirectional Transformer encoder trained with masked-language modelling.

Every position attends to every other (no causal mask). Training masks ``mask_prob`` of the positions
and predicts the original tokens there, replacing a chosen position by the mask token 80 % of the
time, by a random token 10 %, and leaving it unchanged 10 % (BERT's recipe). ``encode()`` returns the
contextual features that downstream heads (classification) build on.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lm.config import EncoderConfig
from lm.models.base import LMOutput
from lm.models.gpt import Block


def mask_tokens(
    tokens: torch.Tensor, *, mask_id: int, vocab_size: int, mask_prob: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT 80/10/10 masking of (B, T) ids → (inputs, selected (B, T) bool). At least one position is chosen."""
    device = tokens.device
    rand = torch.rand(tokens.shape, generator=generator)
    selected = rand < mask_prob
    if not selected.any():
        selected.view(-1)[int(rand.view(-1).argmin())] = True
    action = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator)
    inputs = tokens.cpu().clone()
    inputs[selected & (action < 0.8)] = mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs.to(device), selected.to(device)


class Encoder(nn.Module):
    """``forward(tokens (B, T)) → LMOutput(logits (B, T, V))``; id ``vocab_size`` is the mask token."""

    objective = "mlm"

    def __init__(self, cfg: EncoderConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = vocab_size
        self.mask_id = vocab_size  # one extra embedding row, never predicted
        self.token_embedding = nn.Embedding(vocab_size + 1, cfg.embed_dim)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, dropout=cfg.dropout, bias=cfg.bias, causal=False)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) → contextual features (B, T, C); every position sees the whole window."""
        T = tokens.shape[1]
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        pos = torch.arange(T, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor, state: object = None) -> LMOutput:
        hidden = self.encode(tokens)  # (B, T, C)
        logits = hidden @ self.token_embedding.weight[: self.vocab_size].T  # tied output, (B, T, V)
        return LMOutput(logits, None)

    def score(self, window: torch.Tensor, state: object = None, generator: torch.Generator | None = None):
        """Masked-token loss on the first T tokens of a (B, T + 1) window: (nll sum, masked count, None)."""
        tokens = window[:, :-1]
        inputs, selected = mask_tokens(
            tokens, mask_id=self.mask_id, vocab_size=self.vocab_size, mask_prob=self.cfg.mask_prob, generator=generator
        )
        logits = self(inputs).logits  # (B, T, V)
        nll = F.cross_entropy(logits[selected].float(), tokens[selected], reduction="sum")
        return nll, int(selected.sum()), None

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embedding.weight.numel() + self.position_embedding.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """≈ 6·N + 12·L·d·T, N counting the tied output matrix once (as for the GPT)."""
        cfg = self.cfg
        n = self.num_parameters(non_embedding=True) + self.vocab_size * cfg.embed_dim
        return 6.0 * n + 12.0 * cfg.num_layers * cfg.embed_dim * cfg.context_length
