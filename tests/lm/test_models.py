import pytest
import torch

from lm.config import EncoderConfig, GPTConfig, LSTMConfig
from lm.models import GPT, LanguageModel, LMOutput, build_model


def test_shapes_and_interface(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    assert isinstance(model, GPT) and isinstance(model, LanguageModel)
    tokens = torch.randint(0, 11, (3, 16))
    out = model(tokens)
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 16, 11)
    assert model.encode(tokens).shape == (3, 16, tiny_gpt.embed_dim)


def test_output_at_t_does_not_see_tokens_after_t(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11).eval()
    a = torch.randint(0, 11, (1, 16))
    b = a.clone()
    b[0, 9:] = (b[0, 9:] + 1) % 11  # change every token after position 8
    la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[0, :9], lb[0, :9])
    assert not torch.allclose(la[0, 9:], lb[0, 9:])


def test_input_and_output_embeddings_are_tied(tiny_gpt):
    model = build_model(tiny_gpt, vocab_size=11)
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    untied = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert model.num_parameters() == untied


def test_flops_per_token_follows_the_formula(tiny_gpt):
    model = build_model(tiny_gpt, vocab_size=11)
    n = model.num_parameters(non_embedding=True) + 11 * tiny_gpt.embed_dim
    expected = 6 * n + 12 * tiny_gpt.num_layers * tiny_gpt.embed_dim * tiny_gpt.context_length
    assert model.flops_per_token() == expected


def test_longer_than_context_is_an_error(tiny_gpt):
    model = build_model(tiny_gpt, vocab_size=11)
    with pytest.raises(ValueError, match="exceeds context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GPTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        build_model(GPTConfig(), vocab_size=0)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(num_layers=2, num_heads=2, embed_dim=32, context_length=16),
        LSTMConfig(kind="lstm", num_layers=2, embed_dim=16, hidden_dim=32, context_length=16),
        EncoderConfig(kind="encoder", num_layers=2, num_heads=2, embed_dim=32, context_length=16),
    ],
    ids=lambda c: c.kind,
)
def test_bf16_autocast_agrees_with_fp32(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=11).eval()
    tokens = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        full = torch.log_softmax(model(tokens).logits.float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = torch.log_softmax(model(tokens).logits.float(), -1)
    assert (full - half).abs().max() < 0.05  # bf16 keeps ~3 significant digits
    assert (full.argmax(-1) == half.argmax(-1)).float().mean() > 0.9


def test_rotary_scores_depend_only_on_relative_position():
    from lm.models.gpt import apply_rotary, rotary_tables

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_tables(20, 8, torch.device("cpu"))

    def score(m, n):
        return (apply_rotary(q, cos[m : m + 1], sin[m : m + 1]) * apply_rotary(k, cos[n : n + 1], sin[n : n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(15, 12))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rotary_model_has_no_position_table():
    cfg = GPTConfig(num_layers=1, num_heads=2, embed_dim=8, context_length=8, positions="rotary")
    model = build_model(cfg, vocab_size=5)
    assert not any("position" in name for name in model.state_dict())
    with pytest.raises(ValueError, match="even head width"):
        GPTConfig(num_layers=1, num_heads=2, embed_dim=6, positions="rotary")
