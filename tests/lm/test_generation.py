import torch

from lm.generation import generate
from lm.models import build_model


def test_greedy_equals_argmax_of_full_recomputation(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11).eval()
    prompt = [1, 2, 3]
    out = generate(model, prompt, max_new_tokens=20, temperature=0)  # runs past the 16-token context
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ctx = torch.tensor([ids[-16:]])
            ids.append(int(model(ctx).logits[0, -1].argmax()))
    assert out == ids[3:]


def test_sampling_is_seeded_and_respects_top_k(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    a = generate(model, [1], max_new_tokens=30, temperature=1.0, seed=3)
    b = generate(model, [1], max_new_tokens=30, temperature=1.0, seed=3)
    assert a == b and len(a) == 30
    greedy = generate(model, [1], max_new_tokens=10, temperature=0)
    assert generate(model, [1], max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy
