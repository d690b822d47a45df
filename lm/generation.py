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

    ``temperature == 0`` is greedy decoding (argmax). The context is cropped to the model's
    ``context_length``.
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = ids[:, -model.context_length :]
        logits = model(context).logits[0, -1].float()  # (V,)
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    model.train(was_training)
    return new
