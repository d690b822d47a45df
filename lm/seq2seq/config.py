"""Configs of seq2seq pipelines besides their data (``lm.seq2seq.sources``): lengths and decoding. Frozen."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lm.config import Frozen

ARCHITECTURES = ("decoder", "encoder-decoder")


class LengthConfig(Frozen):
    """How pairs are cut to fit the model. A target keeps its first `max_target_tokens`; a source keeps its first
    tokens up to `max_source_tokens` and, for a decoder, up to what its context leaves after the target (so the
    target is never the part that is cut). The tokenize stage logs how many pairs lost tokens on each side."""

    max_source_tokens: int = Field(default=256, gt=0)
    max_target_tokens: int = Field(default=48, gt=0)


class DecodeConfig(Frozen):
    """How evaluation (and, by default, the served model) decodes: greedy, beam search or sampling."""

    num_beams: int = Field(default=1, ge=1, le=16)
    """Beam width (1: greedy, or sampling with temperature > 0)."""
    length_penalty: float = Field(default=1.0, ge=0.0, le=4.0)
    """Beam search ranks finished hypotheses by log-probability / length ** length_penalty."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0: the most likely token; above 0 it samples (one beam only)."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Longest output (tokens)."""
    eval_pairs: int | None = Field(default=300, gt=0)
    """Validation and test pairs decoded for the metrics (evenly spaced; None: all). Loss is computed on all."""
    samples: int = Field(default=8, ge=1, le=64)
    """Example inputs, references and outputs in the samples table and the run summary."""

    @model_validator(mode="after")
    def _beam_or_sample(self) -> DecodeConfig:
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("decode: beam search (num_beams > 1) is deterministic; set temperature: 0 or num_beams: 1")
        return self


Architecture = Literal["decoder", "encoder-decoder"]
