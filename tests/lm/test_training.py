import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lm.checkpoint import verify_checkpoint
from lm.config import GPTConfig, TrainConfig
from lm.models import build_model
from lm.training import BatchSampler, TrainingError, lr_at, make_optimizer, train


def _tokens(n=4000, vocab=11, seed=0):
    rng = np.random.default_rng(seed)
    # A learnable pattern: mostly repeating 0..vocab-1, with some noise.
    base = np.arange(n) % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_gpt, tiny_train):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    batch = torch.from_numpy(_tokens()[: 4 * 17].reshape(4, 17).astype(np.int64))

    def loss():
        logits = model(batch[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    opt = make_optimizer(model, tiny_train, torch.device("cpu"))
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_batches_are_seeded():
    tokens = _tokens()
    a = BatchSampler(tokens, context_length=8, batch_size=3, seed=1)
    b = BatchSampler(tokens, context_length=8, batch_size=3, seed=1)
    assert torch.equal(a.next(), b.next())
    assert a.next().shape == (3, 9)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(TrainingError, match="fewer than context_length"):
        BatchSampler(np.zeros(5, dtype=np.uint16), context_length=8, batch_size=2, seed=0)


def test_train_reports_metrics_learns_and_writes_a_verified_checkpoint(tiny_gpt, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    cfg = TrainConfig(
        max_steps=60,
        batch_size=8,
        learning_rate=1e-2,
        warmup_steps=5,
        eval_interval=30,
        eval_tokens=256,
        log_interval=10,
        precision="fp32",
        device="cpu",
        seed=0,
    )
    seen: list[tuple[int, dict]] = []
    result = train(
        model,
        _tokens(),
        _tokens(seed=1),
        cfg,
        on_metrics=lambda s, m: seen.append((s, dict(m))),
        checkpoint_dir=tmp_path,
        checkpoint_state={"note": "x"},
    )
    train_steps = [s for s, m in seen if "train_loss" in m]
    assert train_steps == [10, 20, 30, 40, 50, 60]
    assert [s for s, m in seen if "val_loss_estimate" in m] == [30, 60]
    first, last = seen[0][1]["train_loss"], result.train_loss
    assert last < first - 0.5  # the pattern is learnable
    assert math.isfinite(result.val_loss) and result.tokens_per_second > 0
    state = verify_checkpoint(result.checkpoint)
    assert state["step"] == 60 and state["note"] == "x"


def test_bf16_autocast_trains_on_cpu(tiny_gpt):
    torch.manual_seed(0)
    model = build_model(tiny_gpt, vocab_size=11)
    cfg = TrainConfig(
        max_steps=3,
        batch_size=2,
        warmup_steps=1,
        eval_interval=3,
        eval_tokens=64,
        log_interval=1,
        precision="bf16",
        device="cpu",
    )
    result = train(model, _tokens(), _tokens(seed=1), cfg, on_metrics=lambda s, m: None)
    assert math.isfinite(result.train_loss)
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32 under autocast


def test_non_finite_loss_stops_training(tiny_gpt):
    model = build_model(tiny_gpt, vocab_size=11)
    with torch.no_grad():
        model.token_embedding.weight.fill_(float("nan"))
    cfg = TrainConfig(
        max_steps=20, batch_size=2, warmup_steps=1, eval_interval=20, eval_tokens=64, precision="fp32", device="cpu"
    )
    with pytest.raises(TrainingError, match="non-finite for 5 steps"):
        train(model, _tokens(), _tokens(seed=1), cfg, on_metrics=lambda s, m: None)


class Crash(Exception):
    pass


def _resume_cfg(**kw):
    base = dict(
        max_steps=12,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=3,
        eval_interval=6,
        eval_tokens=64,
        log_interval=1,
        precision="fp32",
        device="cpu",
        seed=0,
        checkpoint_interval=4,
        keep_checkpoints=2,
    )
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("crash_at", [1, 6, 9])
def test_interrupted_and_resumed_training_is_bit_identical(crash_at, tmp_path):
    from lm.checkpoint import latest_checkpoint, step_checkpoints

    mcfg = GPTConfig(num_layers=2, num_heads=2, embed_dim=16, context_length=16, dropout=0.1)  # dropout uses RNG
    data, val = _tokens(), _tokens(seed=1)

    torch.manual_seed(0)
    golden = build_model(mcfg, vocab_size=11)
    train(golden, data, val, _resume_cfg(), on_metrics=lambda s, m: None, checkpoint_dir=tmp_path / "golden")
    assert step_checkpoints(tmp_path / "golden") == []  # a finished run keeps only its final weights

    def crash(step, metrics):
        if step == crash_at:
            raise Crash

    torch.manual_seed(0)
    interrupted = build_model(mcfg, vocab_size=11)
    with pytest.raises(Crash):
        train(interrupted, data, val, _resume_cfg(), on_metrics=crash, checkpoint_dir=tmp_path / "run")
    latest, rejected = latest_checkpoint(tmp_path / "run")
    assert rejected == []
    assert (latest is None) == (crash_at < 4)

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = build_model(mcfg, vocab_size=11)
    if latest is None:
        torch.manual_seed(0)
        resumed = build_model(mcfg, vocab_size=11)
    steps = []
    train(
        resumed,
        data,
        val,
        _resume_cfg(),
        on_metrics=lambda s, m: steps.append(s),
        checkpoint_dir=tmp_path / "run",
        resume_from=latest,
    )
    assert steps[0] == (int(latest.name.split("-")[1]) + 1 if latest else 1)
    for (name, a), (_, b) in zip(golden.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    from lm.checkpoint import latest_checkpoint

    torch.manual_seed(0)
    model = build_model(GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8), vocab_size=11)

    def crash(step, metrics):
        if step == 9:
            raise Crash

    with pytest.raises(Crash):  # interrupted: its step checkpoints 4 and 8 stay for a resume
        train(model, _tokens(), _tokens(seed=1), _resume_cfg(), on_metrics=crash, checkpoint_dir=tmp_path)
    newest = tmp_path / "step-00000008"
    (newest / "train_state.safetensors").write_bytes(b"truncated")
    latest, rejected = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step-00000004"
    assert len(rejected) == 1 and "train_state.safetensors does not match its sha256" in rejected[0]
