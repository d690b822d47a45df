"""Model architectures. ``build_model`` is the only place that dispatches on ``cfg.kind``."""

from __future__ import annotations

from torch import nn

from lm.config import ModelConfig
from lm.models.base import LanguageModel, LMOutput
from lm.models.encoder import Encoder
from lm.models.gpt import GPT
from lm.models.lstm import LSTMLM

__all__ = ["GPT", "LSTMLM", "Encoder", "LMOutput", "LanguageModel", "build_model"]


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The model ``cfg`` describes, freshly initialised (seed the global RNG before calling)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    match cfg.kind:
        case "gpt":
            return GPT(cfg, vocab_size)
        case "lstm":
            return LSTMLM(cfg, vocab_size)
        case "encoder":
            return Encoder(cfg, vocab_size)
    raise ValueError(f"unknown model kind {cfg.kind!r}")
