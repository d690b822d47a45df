"""Sampling from any causal LanguageModel: temperature, top-k, top-p, seed, stop condition.

With ``use_cache`` (the default) the model decodes incrementally — the GPT with a KV cache, the LSTM
with its recurrent state — so each new token costs one token's forward pass. Without it every step
recomputes over the last ``context_length`` ids (the reference the cache is tested against).

Past the context window: the reference slides the window one token at a time. A KV cache cannot slide
exactly (a cached token's deeper-layer states saw context that has since left the window), so when the
cache is full it is rebuilt from the last ``context_length // 2`` ids and decoding continues from
there: every token still sees between half and all of the window. Up to ``context_length`` ids (prompt
plus new) both paths are the same computation, token for token.

``max_seconds`` bounds the time: checked between tokens, generation stops there and returns what it has.
What a caller may ask for (params, prompts, caps) is checked in ``lm.generation_params``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from time import monotonic

import torch

from lm.generation_params import GenerationParams

GENERATION_DEFAULTS = GenerationParams().as_dict()
"""Defaults for served generation; ``top_k`` 0 means no top-k filtering, ``top_p`` 1.0 no nucleus cut,
``stop`` "" no stop string (otherwise generation ends at, and includes, its first occurrence)."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
    max_seconds: float | None = None,
) -> list[int]:
    """Append up to ``max_new_tokens`` sampled ids to ``prompt``; returns only the new ids.

    ``temperature == 0`` is greedy decoding (argmax). ``stop(new_ids)`` is asked after every token and
    ends generation when it says yes (the caller trims, e.g. at a stop string). Past ``max_seconds`` from
    the call generation ends after the current token (none at all when the budget is already spent).
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if max_seconds is not None and max_seconds <= 0:
        return []  # the budget is spent
    deadline = None if max_seconds is None else monotonic() + max_seconds
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    ids, new = list(prompt), []
    ctx = model.context_length
    cached = use_cache and hasattr(model, "decode")
    limit = getattr(model, "decode_limit", ctx) if cached else ctx
    window = ids[-ctx:]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], device=device)

    out = model.decode(tensor(window), None) if cached else model(tensor(window))
    held = len(window)  # ids the decoding state holds
    while len(new) < max_new_tokens:
        nxt = _sample(out.logits[0, -1].float(), temperature, top_k, top_p, gen)
        new.append(nxt)
        ids.append(nxt)
        if len(new) >= max_new_tokens or (stop is not None and stop(new)):
            break
        if deadline is not None and monotonic() >= deadline:
            break
        if not cached:
            out = model(tensor(ids[-ctx:]))  # recompute over the sliding window
        elif limit is not None and held >= limit:
            window = ids[-(ctx // 2 or 1) :]  # the cache is full: rebuild it from the recent half window
            out, held = model.decode(tensor(window), None), len(window)
        else:
            out, held = model.decode(tensor([nxt]), out.state), held + 1
    model.train(was_training)
    return new


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator
) -> int:
    """Greedy when ``temperature == 0``; else softmax sampling within the top-k and the top-p nucleus."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # The same distribution as logits / temperature, but a tiny temperature cannot overflow to inf - inf (NaN).
    logits = (logits - logits.max()) / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=gen))
