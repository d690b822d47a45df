import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lm.batches import BatchSampler, StreamSampler
from lm.checkpoint import load_checkpoint, verify_checkpoint
from lm.config import GPTConfig, LSTMConfig, TrainConfig
from lm.models import build_model
from lm.training import TrainingError, lr_at, make_optimizer, train


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
    (wa, continues), (wb, _) = a.next(), b.next()
    assert torch.equal(wa, wb) and not continues
    assert a.next()[0].shape == (3, 9)


def test_stream_windows_continue_each_other_and_restart_at_a_new_offset():
    tokens = np.arange(1000, dtype=np.uint16)  # token value = position: continuity is visible
    s = StreamSampler(tokens, context_length=10, batch_size=4, seed=3)
    first, continues = s.next()
    assert not continues and first.shape == (4, 11)
    starts = first[:, 0].tolist()
    assert len({b - a for a, b in zip(starts, starts[1:], strict=False)}) == 1  # evenly spaced streams
    second, continues = s.next()
    assert continues and torch.equal(second[:, 0], first[:, -1])  # row b picks up where row b stopped
    for _ in range(s.windows - 2):
        s.next()
    restart, continues = s.next()  # a new pass over the streams
    assert not continues and s.position == s.windows + 1
    again = StreamSampler(tokens, context_length=10, batch_size=4, seed=3)
    again.position = s.windows  # the position alone determines the window: exact resume
    assert torch.equal(again.next()[0], restart)


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
    with pytest.raises(TrainingError, match="non-finite loss or gradient norm on 5 steps"):
        train(model, _tokens(), _tokens(seed=1), cfg, on_metrics=lambda s, m: None)


def test_nan_midway_fails_after_the_bound_and_keeps_the_last_good_checkpoint(tmp_path):
    from lm.checkpoint import latest_checkpoint

    torch.manual_seed(0)
    model = build_model(GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8), vocab_size=11)
    real_score = model.score

    def poisoned(window, state=None, generator=None):  # finite until step 6, NaN from then on
        nll, count, state = real_score(window, state, generator)
        return (nll * float("nan") if len(seen) >= 5 else nll), count, state

    seen: list[int] = []
    model.score = poisoned
    cfg = _resume_cfg(max_steps=40, max_nonfinite_steps=3, log_interval=1, eval_interval=100)
    with pytest.raises(TrainingError, match=r"on 3 steps \(train.max_nonfinite_steps\), the last at step 8"):
        train(model, _tokens(), _tokens(seed=1), cfg, on_metrics=lambda s, m: seen.append(s), checkpoint_dir=tmp_path)
    assert seen == [1, 2, 3, 4, 5]  # nothing is reported for skipped steps
    latest, rejected = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step-00000004" and rejected == []
    fresh = build_model(GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8), vocab_size=11)
    assert load_checkpoint(latest, fresh)["step"] == 4
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_gradient_accumulation_matches_one_big_batch():
    mcfg = GPTConfig(num_layers=1, num_heads=2, embed_dim=16, context_length=8)
    models = []
    for batch, accumulation in [(8, 1), (4, 2)]:
        torch.manual_seed(0)
        model = build_model(mcfg, vocab_size=11)
        cfg = _resume_cfg(max_steps=1, batch_size=batch, grad_accumulation=accumulation, checkpoint_interval=0)
        train(model, _tokens(), _tokens(seed=1), cfg, on_metrics=lambda s, m: None)
        models.append(model)
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_early_stopping_keeps_the_best_weights(tmp_path):
    # Train on one pattern, validate on another: the validation loss rises after the first evaluations.
    train_tokens = (np.arange(4000) % 2).astype(np.uint16)
    val_tokens = (np.arange(4000) // 2 % 2).astype(np.uint16)  # 0 0 1 1: half its transitions never trained
    mcfg = GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8)
    cfg = _resume_cfg(
        max_steps=300, learning_rate=0.05, eval_interval=2, early_stopping_patience=2, checkpoint_interval=0
    )
    evals: list[tuple[int, float]] = []
    snapshots: dict[int, dict] = {}
    torch.manual_seed(0)
    model = build_model(mcfg, vocab_size=11)

    def record(step, metrics):
        if "val_loss_estimate" in metrics:
            evals.append((step, metrics["val_loss_estimate"]))
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    result = train(model, train_tokens, val_tokens, cfg, on_metrics=record, checkpoint_dir=tmp_path)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert result.stopped_early and result.steps < 300
    assert result.best_step == best_step and result.val_loss == best_loss
    assert [s for s, _ in evals][-1] == result.steps == best_step + 2 * 2  # two evaluations without improvement
    assert not (tmp_path / "best").exists()
    saved = build_model(mcfg, vocab_size=11)
    assert load_checkpoint(result.checkpoint, saved)["step"] == result.steps
    for name, value in saved.state_dict().items():
        assert torch.equal(value, snapshots[best_step][name]), name  # the best weights, not the last
        assert torch.equal(model.state_dict()[name], value), name


def test_stream_batching_carries_lstm_state_and_resumes_bit_identically(tmp_path):
    from lm.checkpoint import latest_checkpoint

    mcfg = LSTMConfig(kind="lstm", num_layers=1, embed_dim=8, hidden_dim=16, context_length=8)
    cfg = _resume_cfg(batching="streams", max_steps=30, checkpoint_interval=5)  # several passes over the streams
    data, val = _tokens(n=600), _tokens(seed=1)
    torch.manual_seed(0)
    golden = build_model(mcfg, vocab_size=11)
    train(golden, data, val, cfg, on_metrics=lambda s, m: None)

    def crash(step, metrics):
        if step == 13:
            raise Crash

    torch.manual_seed(0)
    model = build_model(mcfg, vocab_size=11)
    with pytest.raises(Crash):
        train(model, data, val, cfg, on_metrics=crash, checkpoint_dir=tmp_path)
    latest, _ = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000010"
    torch.manual_seed(5)
    resumed = build_model(mcfg, vocab_size=11)
    train(resumed, data, val, cfg, on_metrics=lambda s, m: None, checkpoint_dir=tmp_path, resume_from=latest)
    for (name, a), (_, b) in zip(golden.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


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
