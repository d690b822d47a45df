import numpy as np
import torch
from torch.nn import functional as F

from lm.config import LSTMConfig, TrainConfig
from lm.evaluation import mean_loss
from lm.generation import generate
from lm.models import LSTMLM, LanguageModel, build_model
from lm.training import make_optimizer

CFG = LSTMConfig(kind="lstm", num_layers=2, embed_dim=8, hidden_dim=16, context_length=8)


def model(cfg=CFG, vocab=11):
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=vocab).eval()


def test_shapes_state_and_interface():
    m = model()
    assert isinstance(m, LSTMLM) and isinstance(m, LanguageModel)
    out = m(torch.randint(0, 11, (3, 8)))
    assert out.logits.shape == (3, 8, 11)
    h, c = out.state
    assert h.shape == c.shape == (2, 3, 16)
    assert m.encode(torch.randint(0, 11, (3, 8))).shape == (3, 8, 16)


def test_carrying_state_equals_running_the_concatenated_sequence():
    m = model()
    tokens = torch.randint(0, 11, (2, 12))
    whole = m(tokens).logits
    first = m(tokens[:, :5])
    second = m(tokens[:, 5:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole)


def test_tied_and_untied_output():
    tied = model()
    assert tied.head.weight.data_ptr() == tied.embedding.weight.data_ptr()
    untied = model(LSTMConfig(kind="lstm", embed_dim=8, hidden_dim=16, tie_weights=False))
    assert untied.head.weight.shape == (11, 16)
    assert tied.num_parameters() < untied.num_parameters()


def test_one_step_lowers_the_loss():
    m = model().train()
    batch = torch.from_numpy((np.arange(4 * 9) % 11).reshape(4, 9).astype(np.int64))
    opt = make_optimizer(m, TrainConfig(learning_rate=1e-2, weight_decay=0.0), torch.device("cpu"))

    def loss():
        return F.cross_entropy(m(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_greedy_generation_with_state_equals_full_recomputation():
    m = model()
    new = generate(m, [1, 2, 3], max_new_tokens=15, temperature=0)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(15):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[3:]


def test_evaluation_carries_state_across_windows():
    m = model()
    tokens = np.random.default_rng(0).integers(0, 11, 8 * 5 + 1)
    loss, count = mean_loss(m, tokens, context_length=8, batch_size=1)
    with torch.no_grad():
        t = torch.from_numpy(tokens.astype(np.int64))[None]
        reference = F.cross_entropy(m(t[:, :-1]).logits.flatten(0, 1), t[0, 1:]).item()
    assert count == 40
    assert abs(loss - reference) < 1e-5  # one stream, state carried: same as reading it whole
