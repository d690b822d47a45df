"""One training loop for every architecture: AdamW, warm-up + cosine, clipping, bf16 autocast.

The loop reports through ``on_metrics(step, metrics)`` and never touches tracking, orchestration,
the environment or the working directory: device, precision, seed and paths are all parameters.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lm.checkpoint import (
    STEP_PREFIX,
    load_checkpoint,
    load_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from lm.config import TrainConfig
from lm.evaluation import mean_loss

MetricSink = Callable[[int, Mapping[str, float]], None]
MAX_BAD_STEPS = 5


class TrainingError(RuntimeError):
    """Training cannot continue (for example: the loss stayed non-finite)."""


class TrainingInterrupted(Exception):
    """A stop was requested; training finished the step in progress and checkpointed it (if it could)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint directory"
        super().__init__(f"training stopped on request after step {step}{where}")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float
    wall_seconds: float
    tokens_per_second: float
    checkpoint: Path | None


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # native bf16 matmuls (AVX-512 BF16 / AMX) make autocast a speed-up on CPU
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``choice`` (None means plain fp32)."""
    if choice == "fp32" or (choice == "auto" and not bf16_supported(device)):
        return None
    return torch.bfloat16


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` × peak at ``max_steps``."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), fused=True)


class BatchSampler:
    """Random windows of ``context_length + 1`` tokens from a flat token array, seeded."""

    def __init__(self, tokens: np.ndarray, *, context_length: int, batch_size: int, seed: int):
        if tokens.size < context_length + 2:
            raise TrainingError(
                f"training split has {tokens.size} tokens, fewer than context_length + 2 "
                f"({context_length + 2}); use more data or a shorter context_length"
            )
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        """(batch_size, context_length + 1) int64: inputs are [:, :-1], targets [:, 1:]."""
        high = self.tokens.size - self.context_length - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        window = np.stack([self.tokens[s : s + self.context_length + 1] for s in starts])
        return torch.from_numpy(window.astype(np.int64))


def training_state(optimizer: torch.optim.Optimizer, sampler: BatchSampler) -> tuple[dict, dict]:
    """What resuming needs besides the weights: (tensors, JSON) — optimizer moments and every RNG."""
    sd = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = sampler.generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"param_groups": sd["param_groups"], "optimizer_state": {str(i): sorted(s) for i, s in sd["state"].items()}}
    return tensors, meta


def restore_training_state(optimizer, sampler: BatchSampler, tensors: dict, meta: dict) -> None:
    """Inverse of ``training_state``."""
    state = {int(i): {k: tensors[f"optim.{i}.{k}"] for k in keys} for i, keys in meta["optimizer_state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    sampler.generator.set_state(tensors["rng.sampler"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def train(
    model: nn.Module,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    cfg: TrainConfig,
    *,
    on_metrics: MetricSink,
    checkpoint_dir: Path | None = None,
    checkpoint_state: Mapping[str, object] | None = None,
    resume_from: Path | None = None,
    before_checkpoint: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` steps; evaluate every ``cfg.eval_interval``.

    Writes the final weights to ``checkpoint_dir/final`` when given, with ``checkpoint_state`` (JSON)
    merged into the saved state, and every ``cfg.checkpoint_interval`` steps a resumable
    ``checkpoint_dir/step-NNNNNNNN`` (weights, optimizer, RNG and batch-order state; the newest
    ``cfg.keep_checkpoints`` are kept). ``resume_from`` continues from such a checkpoint; on CPU the
    result is bit-identical to an uninterrupted run. ``before_checkpoint(step)`` runs first, so a metric
    sink can make everything reported up to ``step`` durable before a resume could start from it.
    ``should_stop()`` is asked after every step; when it says yes, training checkpoints that step and
    raises TrainingInterrupted (the caller decides what a stop request is: a signal, a deadline).
    """
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    model.to(device).train()
    ctx = model.context_length
    sampler = BatchSampler(train_tokens, context_length=ctx, batch_size=cfg.batch_size, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg, device)
    tokens_per_step = cfg.batch_size * ctx
    rates: list[float] = []
    losses: list[float] = []
    val_loss, bad_steps, t0, start = float("nan"), 0, time.perf_counter(), 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model)
        restore_training_state(optimizer, sampler, load_tensors(resume_from), state["training"])
        start = state["step"]

    def checkpoint(step: int) -> None:
        if before_checkpoint is not None:
            before_checkpoint(step)
        tensors, meta = training_state(optimizer, sampler)
        state = {"step": step, "training": meta, **(checkpoint_state or {})}
        save_checkpoint(Path(checkpoint_dir) / f"{STEP_PREFIX}{step:08d}", model, state, tensors)
        prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)

    def validate(step: int) -> float:
        loss, _ = mean_loss(
            model,
            val_tokens,
            context_length=ctx,
            batch_size=cfg.batch_size,
            device=device,
            autocast_dtype=amp_dtype,
            max_tokens=cfg.eval_tokens,
        )
        on_metrics(step, {"val_loss_estimate": loss})
        return loss

    for step in range(start, cfg.max_steps):
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = sampler.next().to(device)  # (B, T + 1)
        with amp():
            nll, count, _ = model.score(batch, generator=sampler.generator)  # the model's own objective
        loss = nll / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        loss_value = loss.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            bad_steps += 1  # skip the update; weights stay at the last good values
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingError(f"loss or gradient non-finite for {bad_steps} steps (last at step {step})")
            continue
        optimizer.step()
        losses.append(loss_value)
        rates.append(tokens_per_step / (time.perf_counter() - t_step))
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            window = losses[-cfg.log_interval :]
            on_metrics(
                done,
                {
                    "train_loss": sum(window) / len(window),
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "tokens_per_second": statistics.median(rates[-cfg.log_interval :]),
                },
            )
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val_loss = validate(done)
        if checkpoint_dir is not None and cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0:
            checkpoint(done)
        if should_stop is not None and should_stop() and done < cfg.max_steps:
            if checkpoint_dir is not None:
                checkpoint(done)
            raise TrainingInterrupted(
                done, Path(checkpoint_dir) / f"{STEP_PREFIX}{done:08d}" if checkpoint_dir else None
            )

    wall = time.perf_counter() - t0
    checkpoint = None
    if checkpoint_dir is not None:
        state = {"step": cfg.max_steps, "val_loss_estimate": val_loss, **(checkpoint_state or {})}
        checkpoint = save_checkpoint(Path(checkpoint_dir) / "final", model, state)
        prune_checkpoints(checkpoint_dir, 0)  # finished: the resumable step checkpoints have served
    steady = rates[min(len(rates) - 1, 5) :] if rates else [0.0]  # skip warm-up steps
    return TrainResult(
        steps=cfg.max_steps,
        train_loss=losses[-1] if losses else float("nan"),
        val_loss=val_loss,
        wall_seconds=wall,
        tokens_per_second=statistics.median(steady),
        checkpoint=checkpoint,
    )
