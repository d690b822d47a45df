"""Decoding a seq2seq model (``lm.seq2seq.model``): greedy, sampling and beam search.

The source is read once (``start``: the prefix LM's prompt through its KV cache or recurrent state, the
encoder–decoder's encoder); each new token then costs one token's forward pass (``step``). Beam search keeps
``num_beams`` rows in the decoding state and reorders them (``select``) as hypotheses are kept, dropped and copied.
``use_cache=False`` recomputes every step from scratch (``recompute``): the reference the cache is tested against.

A hypothesis ends at the end-of-target id (not part of the output) or at ``max_new_tokens``. The separator is
never generated. Beam search ranks finished hypotheses by log-probability / length ** ``length_penalty`` (as in
Hugging Face's ``generate``) and stops once ``num_beams`` hypotheses have finished; with one beam it is greedy.
"""

from __future__ import annotations

import math
from time import monotonic

import torch

from lm.generation import _sample


@torch.no_grad()
def decode(
    model,
    source: list[int],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    max_seconds: float | None = None,
) -> list[int]:
    """The target ids decoded for ``source`` ids (without the end-of-target id). ``temperature`` 0 is greedy;
    above 0 it samples (one beam only). Past ``max_seconds`` decoding ends with what it has."""
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search is deterministic: use num_beams 1 to sample (temperature > 0)")
    limit = model.max_new_tokens(len(source))
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit)
    deadline = None if max_seconds is None else monotonic() + max_seconds
    was_training = model.training
    model.eval()
    try:
        if budget <= 0:
            return []
        if num_beams > 1:
            return _beam(model, source, budget, num_beams, length_penalty, use_cache, deadline)
        return _one(model, source, budget, temperature, top_k, top_p, seed, use_cache, deadline)
    finally:
        model.train(was_training)


def _allowed(logits: torch.Tensor, model) -> torch.Tensor:
    """Logits with the separator ruled out (it only ever ends a source)."""
    logits = logits.float().clone()
    logits[..., model.sep_id] = -math.inf
    return logits


def _one(model, source, budget, temperature, top_k, top_p, seed, use_cache, deadline) -> list[int]:
    """Greedy (``temperature`` 0) or sampled decoding of one hypothesis."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    new: list[int] = []
    logits, state = model.start(source) if use_cache else (model.recompute(source, [])[None], None)
    while len(new) < budget:
        token = _sample(_allowed(logits[0], model), temperature, top_k, top_p, gen)
        if token == model.eos_id:
            break
        new.append(token)
        if len(new) >= budget or (deadline is not None and monotonic() >= deadline):
            break
        if use_cache:
            logits, state = model.step(torch.tensor([token], device=model.device), state)
        else:
            logits = model.recompute(source, new)[None]
    return new


def _beam(model, source, budget, num_beams, length_penalty, use_cache, deadline) -> list[int]:
    """Beam search: ``num_beams`` live hypotheses, each step's candidates their top 2 × num_beams extensions."""
    logits, state = model.start(source) if use_cache else (model.recompute(source, [])[None], None)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for length in range(1, budget + 1):
        logprobs = torch.log_softmax(_allowed(logits, model), dim=-1)  # (live beams, V)
        totals = logprobs + torch.tensor([score for _, score in beams], device=logprobs.device)[:, None]
        top = torch.topk(totals.flatten(), min(2 * num_beams, totals.numel()))
        kept, rows = [], []
        for value, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(flat, totals.shape[1])
            if token == model.eos_id:
                finished.append((value / max(1, length - 1) ** length_penalty, beams[row][0]))
            else:
                kept.append((beams[row][0] + [token], value))
                rows.append(row)
            if len(kept) == num_beams:
                break
        if len(finished) >= num_beams or not kept or (deadline is not None and monotonic() >= deadline):
            break
        if length == budget:  # out of room: the live hypotheses end here
            finished += [(score / length**length_penalty, ids) for ids, score in kept]
            break
        beams = kept
        tokens = torch.tensor([ids[-1] for ids, _ in beams], device=model.device)
        if use_cache:
            logits, state = model.step(tokens, model.select(state, torch.tensor(rows, device=model.device)))
        else:
            logits = torch.stack([model.recompute(source, ids) for ids, _ in beams])
    if not finished:
        finished = [(score / max(1, len(ids)) ** length_penalty, ids) for ids, score in beams]
    return max(finished, key=lambda f: f[0])[1]
