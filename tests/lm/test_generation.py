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


def test_time_budget_stops_generation_between_tokens_with_what_it_has(tiny_gpt, monkeypatch):
    import lm.generation

    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    clock = iter(range(10_000))  # every look at the clock is one second later
    monkeypatch.setattr(lm.generation, "monotonic", lambda: float(next(clock)))
    out = generate(model, [1], max_new_tokens=1_000, temperature=0, max_seconds=5)
    assert 0 < len(out) <= 5
    assert out == generate(model, [1], max_new_tokens=len(out), temperature=0)  # the same tokens, cut short
    assert generate(model, [1], max_new_tokens=10, temperature=0, max_seconds=0) == []  # a spent budget


def test_a_tiny_temperature_samples_like_greedy_instead_of_crashing(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    greedy = generate(model, [1], max_new_tokens=10, temperature=0)
    assert generate(model, [1], max_new_tokens=10, temperature=1e-300, seed=1) == greedy


BAD_PARAMS = [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer from 1 to 4096, got 0"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 4097}, "from 1 to 4096, got 4097"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": "12"}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": -1}, "temperature must be a finite number ≥ 0, got -1"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"top_k": -3}, "top_k must be an integer ≥ 0, got -3"),
    ({"top_k": 1.0}, "top_k"),
    ({"top_p": 2}, "top_p must be a finite number in (0, 1], got 2"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop": 5}, "stop must be a string"),
    ({"stop": "x" * 257}, "stop"),
    ({"temprature": 0.5}, "unknown param 'temprature': the params are max_new_tokens, temperature, top_k, top_p"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_PARAMS, ids=[str(list(r)[0]) for r, _ in BAD_PARAMS])
def test_each_invalid_param_is_one_line_naming_it_and_its_range(raw, message):
    from lm.generation_params import GenerationParams

    with pytest.raises(ValueError, match="^[^\n]+$") as error:
        GenerationParams.parse(raw)
    assert message in str(error.value)


def test_params_take_defaults_and_the_cap_is_configurable():
    import numpy as np

    from lm.generation import GENERATION_DEFAULTS
    from lm.generation_params import GenerationLimits, GenerationParams

    assert GenerationParams.parse(None).as_dict() == GENERATION_DEFAULTS
    parsed = GenerationParams.parse({"max_new_tokens": np.int64(10), "temperature": 0, "top_p": 0.5, "stop": "\n"})
    assert parsed == GenerationParams(max_new_tokens=10, temperature=0.0, top_k=40, top_p=0.5, seed=0, stop="\n")
    assert type(parsed.max_new_tokens) is int and type(parsed.temperature) is float
    assert GenerationParams.parse({"max_new_tokens": 50_000}, GenerationLimits(max_new_tokens=50_000)).max_new_tokens
    assert GenerationParams.parse({}, GenerationLimits(max_new_tokens=10)).max_new_tokens == 10  # the default, capped
    with pytest.raises(ValueError, match="from 1 to 10, got 11"):
        GenerationParams.parse({"max_new_tokens": 11}, GenerationLimits(max_new_tokens=10))
    with pytest.raises(ValueError, match="params must be an object"):
        GenerationParams.parse([("max_new_tokens", 3)])
    with pytest.raises(ValueError, match="max_seconds must be a finite number > 0"):
        GenerationLimits(max_seconds=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer ≥ 1"):
        GenerationLimits(max_new_tokens=0)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([123], "inputs must be strings, got 123 (int) at index 0"),
        (["a", None], "inputs must be strings, got null at index 1"),
        ([float("nan")], "inputs must be strings"),
        ([["a"]], "inputs must be strings"),
        (["a" * 11], "input 0 is 11 characters long; at most 10 are allowed"),
        (["a"] * 4, "inputs hold 4 prompts; at most 3 are allowed"),
    ],
)
def test_prompts_are_strings_only_within_the_limits(prompts, message):
    from lm.generation_params import GenerationLimits, check_prompts

    with pytest.raises(ValueError, match="^[^\n]+$") as error:
        check_prompts(prompts, GenerationLimits(max_prompt_chars=10, max_prompts=3))
    assert message in str(error.value)
    assert check_prompts(["", "ROMEO:\n"], GenerationLimits(max_prompt_chars=10)) == ["", "ROMEO:\n"]
