"""Sampling from any LanguageModel: temperature, top-k, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GENERATION_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40, "seed": 0}
"""Defaults for served generation; ``top_k`` 0 means no top-k filtering."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Append ``max_new_tokens`` sampled ids to ``prompt``; returns only the new ids.

    ``temperature == 0`` is greedy decoding (argmax). A model that returns a state (LSTM) is fed one
    token at a time with it; one that does not (GPT) recomputes over the last ``context_length`` ids.
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    ids = list(prompt)
    out = model(torch.tensor([ids[-model.context_length :]], device=device))  # the prompt: (1, T)
    new: list[int] = []
    while len(new) < max_new_tokens:
        nxt = _sample(out.logits[0, -1].float(), temperature, top_k, gen)
        new.append(nxt)
        ids.append(nxt)
        if len(new) == max_new_tokens:
            break
        if out.state is not None:  # recurrent: feed one token, carry the state
            out = model(torch.tensor([[nxt]], device=device), state=out.state)
        else:  # attention: recompute over the (cropped) context
            out = model(torch.tensor([ids[-model.context_length :]], device=device))
    model.train(was_training)
    return new


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    """Greedy when ``temperature == 0``; else softmax sampling over the top-k logits."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=gen))
