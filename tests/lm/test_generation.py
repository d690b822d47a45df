import pytest
import torch

from lm.generation import generate
from lm.models import build_model


def _reference_greedy(model, prompt, n, ctx=16):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-ctx:]])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_recompute_path_slides_the_window_like_argmax_of_full_recomputation(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11).eval()
    out = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0, use_cache=False)  # past the context
    assert out == _reference_greedy(model, [1, 2, 3], 20)


def test_kv_cache_greedy_equals_full_recomputation_token_for_token(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11).eval()
    with torch.no_grad():  # larger weights: a sharper distribution than a fresh init, fewer near-ties
        for p in model.parameters():
            p.mul_(8.0)
    for prompt in ([1, 2, 3], [4], list(range(11)) + [3, 2]):
        n = 16 - len(prompt) + 1  # up to a full window of context for the last prediction
        cached = generate(model, prompt, max_new_tokens=n, temperature=0)
        assert cached == generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=False)
        assert cached == _reference_greedy(model, prompt, n)


def test_kv_cache_keeps_generating_past_the_context(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11).eval()
    out = generate(model, [1, 2, 3], max_new_tokens=50, temperature=0)
    assert len(out) == 50 and all(0 <= t < 11 for t in out)
    assert out[:14] == _reference_greedy(model, [1, 2, 3], 14)  # identical while the window is not full


def test_sampling_is_seeded_and_respects_top_k_and_top_p(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    a = generate(model, [1], max_new_tokens=30, temperature=1.0, seed=3)
    b = generate(model, [1], max_new_tokens=30, temperature=1.0, seed=3)
    assert a == b and len(a) == 30
    greedy = generate(model, [1], max_new_tokens=10, temperature=0)
    assert generate(model, [1], max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy
    assert generate(model, [1], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5) == greedy
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], max_new_tokens=1, top_p=0.0)


def test_stop_condition_ends_generation(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    full = generate(model, [1], max_new_tokens=40, temperature=1.0, seed=7)
    target = full[5]
    stopped = generate(model, [1], max_new_tokens=40, temperature=1.0, seed=7, stop=lambda new: new[-1] == target)
    assert stopped == full[: full.index(target) + 1]
