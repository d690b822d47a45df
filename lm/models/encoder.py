"""BERT-style bidirectional Transformer encoder trained with masked-language modelling.

Every position attends to every other (no causal mask). Training masks ``mask_prob`` of the positions
and predicts the original tokens there, replacing a chosen position by the mask token 80 % of the
time, by a random token 10 %, and leaving it unchanged 10 % (BERT's recipe). ``encode()`` returns the
contextual features that downstream heads (classification) build on.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lm.config import EncoderConfig
from lm.models.base import LMOutput
from lm.models.gpt import Transformer


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


class Encoder(Transformer):
    """``forward(tokens (B, T)) → LMOutput(logits (B, T, V))``; id ``vocab_size`` is the mask token."""

    objective = "mlm"

    def __init__(self, cfg: EncoderConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, causal=False, extra_tokens=1)  # one extra row: the mask token
        self.mask_id = vocab_size

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
