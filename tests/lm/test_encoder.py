import numpy as np
import pytest
import torch

from lm.config import EncoderConfig, TrainConfig
from lm.evaluation import mean_loss
from lm.models import Encoder, LanguageModel, build_model
from lm.models.encoder import mask_tokens
from lm.training import train

CFG = EncoderConfig(kind="encoder", num_layers=2, num_heads=2, embed_dim=16, context_length=16)


def model():
    torch.manual_seed(0)
    return build_model(CFG, vocab_size=11).eval()


def test_shapes_interface_and_mask_token():
    m = model()
    assert isinstance(m, Encoder) and isinstance(m, LanguageModel) and m.objective == "mlm"
    tokens = torch.randint(0, 11, (3, 16))
    assert m(tokens).logits.shape == (3, 16, 11)  # the mask id is an input only, never predicted
    assert m.encode(tokens).shape == (3, 16, 16)
    assert m.token_embedding.num_embeddings == 12 and m.mask_id == 11


def test_encoder_sees_both_directions():
    m = model()
    a = torch.randint(0, 11, (1, 16))
    b = a.clone()
    b[0, 12] = (b[0, 12] + 1) % 11  # change a later token
    ha, hb = m.encode(a), m.encode(b)
    assert (ha[0, :12] - hb[0, :12]).abs().max() > 0  # earlier positions see it (a decoder's would not)


def test_masking_follows_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 256))
    inputs, selected = mask_tokens(tokens, mask_id=50, vocab_size=50, mask_prob=0.15, generator=g)
    rate = selected.float().mean().item()
    assert 0.14 < rate < 0.16
    chosen_inputs, chosen_tokens = inputs[selected], tokens[selected]
    masked = (chosen_inputs == 50).float().mean().item()
    kept = (chosen_inputs == chosen_tokens).float().mean().item()
    assert 0.78 < masked < 0.82 and 0.09 < kept < 0.13  # kept includes random draws of the same id
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_training_lowers_the_masked_lm_loss():
    rng = np.random.default_rng(0)
    data = (np.arange(6000) % 11).astype(np.uint16)
    noise = rng.random(6000) < 0.05
    data[noise] = rng.integers(0, 11, noise.sum())
    torch.manual_seed(0)
    m = build_model(CFG.model_copy(update={"embed_dim": 32}), vocab_size=11)
    before, _ = mean_loss(m, data[:2000], context_length=16, batch_size=8)
    cfg = TrainConfig(
        max_steps=200,
        batch_size=16,
        learning_rate=1e-2,
        warmup_steps=10,
        eval_interval=200,
        eval_tokens=256,
        precision="fp32",
        device="cpu",
    )
    train(m, data, data[:2000], cfg, on_metrics=lambda s, metrics: None)
    after, scored = mean_loss(m, data[:2000], context_length=16, batch_size=8)
    assert after < before - 0.5  # from ≈ log(11) = 2.4 nats: 1.3–1.5 here, whatever the CPU's kernels
    assert 0 < scored < 2000 * 0.3  # only masked positions are scored


def test_masked_evaluation_is_deterministic():
    data = (np.arange(3000) % 11).astype(np.uint16)
    m = model()
    assert mean_loss(m, data, context_length=16) == mean_loss(m, data, context_length=16)


def test_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="exceeds context_length 16"):
        model().encode(torch.zeros(1, 17, dtype=torch.long))
