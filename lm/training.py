"""One training loop for every architecture: AdamW, warm-up + cosine, clipping, gradient accumulation,
bf16 autocast, optional ``torch.compile``, early stopping and a non-finite guard.

The loop reports through ``on_metrics(step, metrics)`` and never touches tracking, orchestration,
the environment or the working directory: device, precision, seed and paths are all parameters.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lm import distributed
from lm.checkpoint import (
    STEP_PREFIX,
    load_checkpoint,
    load_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from lm.classification.examples import Examples, ExampleSampler
from lm.classification.metrics import validation_loss
from lm.config import TrainConfig
from lm.distributed import DistContext
from lm.evaluation import mean_loss
from lm.runtime import TrainingError, resolve_device, resolve_precision, resolve_runtime  # noqa: F401 — re-exported

MetricSink = Callable[[int, Mapping[str, float]], None]


class TrainingInterrupted(Exception):
    """A stop was requested; training finished the step in progress and checkpointed it (if it could)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = f", checkpoint {checkpoint}" if checkpoint else ", no checkpoint directory"
        super().__init__(f"training stopped on request after step {step}{where}")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    """Optimizer steps taken (fewer than ``max_steps`` when early stopping ended the run)."""
    train_loss: float
    val_loss: float
    wall_seconds: float
    tokens_per_second: float
    checkpoint: Path | None
    best_step: int | None = None
    """Step of the best periodic validation estimate (the weights kept when early stopping)."""
    stopped_early: bool = False


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
    """Random windows of ``context_length + 1`` tokens from a flat token array, seeded.

    ``next()`` → (window, continues): ``continues`` says whether row b follows on from row b of the
    previous window (never, here), i.e. whether a recurrent state may be carried into it.
    """

    def __init__(self, tokens: np.ndarray, *, context_length: int, batch_size: int, seed: int):
        if tokens.size < context_length + 2:
            raise TrainingError(
                f"training split has {tokens.size} tokens, fewer than context_length + 2 "
                f"({context_length + 2}); use more data or a shorter context_length"
            )
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # windows drawn so far
        self.rows = slice(None)  # this process's rows of each batch (all, unless data-parallel)

    def _window(self, starts: list[int]) -> torch.Tensor:
        window = np.stack([self.tokens[s : s + self.context_length + 1] for s in starts[self.rows]])
        return torch.from_numpy(window.astype(np.int64))

    def next(self) -> tuple[torch.Tensor, bool]:
        """(batch_size, context_length + 1) int64 — inputs are [:, :-1], targets [:, 1:] — and False."""
        high = self.tokens.size - self.context_length - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        self.position += 1
        return self._window(starts), False


class StreamSampler(BatchSampler):
    """The split cut into ``batch_size`` contiguous streams, read one window after another.

    Row b of each window continues row b of the previous one, so a recurrent model can carry its state
    across windows (truncated back-propagation through time). Each pass over the streams starts at a
    seeded offset below ``context_length`` so window boundaries move between epochs. The position is
    just the number of windows drawn, which makes resuming exact.
    """

    def __init__(self, tokens: np.ndarray, *, context_length: int, batch_size: int, seed: int):
        super().__init__(tokens, context_length=context_length, batch_size=batch_size, seed=seed)
        T = context_length
        self.stream_length = (tokens.size - T - 1) // batch_size // T * T  # whole windows, room for an offset
        if self.stream_length < T:
            raise TrainingError(
                f"training split has {tokens.size} tokens, too few for {batch_size} streams of at least one "
                f"window of {T} (+ offset); use batching: random, a smaller batch_size or more data"
            )
        self.windows = self.stream_length // T
        self.seed = seed

    def next(self) -> tuple[torch.Tensor, bool]:
        epoch, index = divmod(self.position, self.windows)
        offset = int(np.random.default_rng([self.seed, epoch]).integers(self.context_length))
        starts = [offset + b * self.stream_length + index * self.context_length for b in range(self.batch_size)]
        self.position += 1
        return self._window(starts), index > 0


def make_sampler(data: np.ndarray | Examples, cfg: TrainConfig, context_length: int) -> BatchSampler | ExampleSampler:
    """Windows of a token array (language models), or batches of labelled examples (classifiers)."""
    if isinstance(data, Examples):
        return ExampleSampler(data, batch_size=cfg.batch_size, seed=cfg.seed)
    kind = StreamSampler if cfg.batching == "streams" else BatchSampler
    sampler = kind(data, context_length=context_length, batch_size=cfg.batch_size, seed=cfg.seed)
    sampler.tokens_per_batch = cfg.batch_size * context_length
    return sampler


def validation_estimate(model: nn.Module, data: np.ndarray | Examples, cfg: TrainConfig, device, amp_dtype) -> float:
    """The periodic validation loss on the first ``cfg.eval_tokens`` tokens (or examples' worth of them)."""
    if isinstance(data, Examples):
        per_example = max(1, int(np.mean(data.lengths)))
        return validation_loss(
            model,
            data,
            batch_size=cfg.batch_size,
            device=device,
            autocast_dtype=amp_dtype,
            max_examples=max(1, cfg.eval_tokens // per_example),
        )[0]
    loss, _ = mean_loss(
        model,
        data,
        context_length=model.context_length,
        batch_size=cfg.batch_size,
        device=device,
        autocast_dtype=amp_dtype,
        max_tokens=cfg.eval_tokens,
    )
    return loss


def detach_state(state):
    """A recurrent state cut from the graph (tensors, or tuples/lists of them, or None)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    return state


def state_tensors(state) -> dict[str, torch.Tensor]:
    """A carried recurrent state as named tensors for a checkpoint (``carry.0``, ``carry.1``, …)."""
    flat = [state] if isinstance(state, torch.Tensor) else list(state or ())
    return {f"carry.{i}": t.detach().cpu() for i, t in enumerate(flat)}


def tensors_state(tensors: Mapping[str, torch.Tensor], device: torch.device):
    """Inverse of ``state_tensors`` (a tuple, or None when nothing was carried)."""
    flat = [tensors[f"carry.{i}"].to(device) for i in range(sum(k.startswith("carry.") for k in tensors))]
    return tuple(flat) or None


def training_state(optimizer: torch.optim.Optimizer, sampler: BatchSampler) -> tuple[dict, dict]:
    """What resuming needs besides the weights: (tensors, JSON) — optimizer moments and every RNG."""
    sd = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = sampler.generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "param_groups": sd["param_groups"],
        "optimizer_state": {str(i): sorted(s) for i, s in sd["state"].items()},
        "sampler_position": sampler.position,
    }
    return tensors, meta


def restore_training_state(optimizer, sampler: BatchSampler, tensors: dict, meta: dict) -> None:
    """Inverse of ``training_state``."""
    state = {int(i): {k: tensors[f"optim.{i}.{k}"] for k in keys} for i, keys in meta["optimizer_state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    sampler.generator.set_state(tensors["rng.sampler"])
    sampler.position = meta.get("sampler_position", 0)
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def train(
    model: nn.Module,
    train_tokens: np.ndarray | Examples,
    val_tokens: np.ndarray | Examples,
    cfg: TrainConfig,
    *,
    on_metrics: MetricSink,
    checkpoint_dir: Path | None = None,
    checkpoint_state: Mapping[str, object] | None = None,
    resume_from: Path | None = None,
    before_checkpoint: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    peak_flops: float | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` steps; evaluate every ``cfg.eval_interval``.

    Writes the final weights to ``checkpoint_dir/final`` when given, with ``checkpoint_state`` (JSON)
    merged into the saved state, and every ``cfg.checkpoint_interval`` steps a resumable
    ``checkpoint_dir/step-NNNNNNNN`` (weights, optimizer, RNG, batch position and carried recurrent
    state; the newest ``cfg.keep_checkpoints`` are kept). ``resume_from`` continues from such a
    checkpoint; on CPU the result is bit-identical to an uninterrupted run. ``before_checkpoint(step)``
    runs first, so a metric sink can make everything reported up to ``step`` durable before a resume
    could start from it. ``should_stop()`` is asked after every step; when it says yes, training
    checkpoints that step and raises TrainingInterrupted (the caller decides what a stop request is).

    A step whose loss or gradient norm is NaN/inf is skipped (weights untouched); after
    ``cfg.max_nonfinite_steps`` such steps TrainingError says so, and the checkpoints written before
    stay loadable. With ``cfg.early_stopping_patience`` the run ends after that many periodic
    evaluations without improvement, keeping the best weights. ``peak_flops`` (FLOP/s of this device
    at this precision) adds model FLOPs utilisation (``mfu``) to the reported metrics.

    ``train_tokens`` and ``val_tokens`` are token arrays, or labelled ``Examples`` for a classifier.
    With ``dist`` (one rank of a ``torchrun`` job, process group initialised) the rank trains its rows of
    every global batch under DistributedDataParallel; rank 0 alone reports, validates and checkpoints
    (see ``lm.distributed``).
    """
    runtime = resolve_runtime(cfg, local_rank=dist.local_rank if dist is not None else None)
    device, amp_dtype, amp = runtime.device, runtime.amp_dtype, runtime.autocast
    main = dist is None or dist.is_main
    report = on_metrics if main else (lambda step, metrics: None)
    model.to(device).train()
    ctx = model.context_length
    sampler = make_sampler(train_tokens, cfg, ctx)
    optimizer = make_optimizer(model, cfg, device)
    score = model.score
    if dist is not None:
        if sampler.batch_size % dist.world_size:
            raise TrainingError(
                f"train.batch_size ({sampler.batch_size}) must be divisible by the {dist.world_size} processes "
                "so every rank reads an equal share of each global batch; change batch_size or nproc_per_node"
            )
        sampler.rows = dist.rows(sampler.batch_size)
        score = distributed.wrap(model, dist, device)
    score = torch.compile(score) if cfg.compile else score
    tokens_per_step = sampler.tokens_per_batch * cfg.grad_accumulation
    flops_per_token = model.flops_per_token() if peak_flops else None
    rates: list[float] = []
    losses: list[float] = []
    carry = None  # recurrent state carried between stream windows
    val_loss, bad_steps, t0, start = float("nan"), 0, time.perf_counter(), 0
    best = {"loss": math.inf, "step": None, "evals_since": 0}
    best_weights: dict[str, torch.Tensor] | None = None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model)
        tensors = load_tensors(resume_from)
        restore_training_state(optimizer, sampler, tensors, state["training"])
        if dist is not None and f"rng.torch.rank{dist.rank}" in tensors:  # each rank's own dropout stream
            torch.set_rng_state(tensors[f"rng.torch.rank{dist.rank}"])
        carry = tensors_state(tensors, device)
        if dist is not None and carry is not None:  # the checkpoint holds the whole batch's state: take our rows
            carry = tuple(t[:, sampler.rows].contiguous() for t in carry)
        start, bad_steps = state["step"], state["training"].get("nonfinite_steps", 0)
        best = state["training"].get("best", best)
        best_dir = Path(resume_from).parent / "best"
        if cfg.early_stopping_patience and best["step"] is not None and (best_dir / "MANIFEST.json").exists():
            best_weights = {k: v.clone() for k, v in _weights_of(best_dir, model).items()}

    def checkpoint(step: int) -> None:
        ranks_rng = distributed.gather_rng(device) if dist is not None else []  # collectives: every rank
        whole_carry = distributed.gather_rows(carry, dist.world_size) if dist is not None else carry
        if not main:
            return
        if before_checkpoint is not None:
            before_checkpoint(step)
        tensors, meta = training_state(optimizer, sampler)
        tensors |= state_tensors(whole_carry) | {f"rng.torch.rank{k}": s for k, s in enumerate(ranks_rng)}
        meta |= {"nonfinite_steps": bad_steps, "best": best}
        state = {"step": step, "training": meta, **(checkpoint_state or {})}
        save_checkpoint(Path(checkpoint_dir) / f"{STEP_PREFIX}{step:08d}", model, state, tensors)
        prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)

    def validate(step: int) -> float:
        loss = validation_estimate(model, val_tokens, cfg, device, amp_dtype) if main else 0.0
        if dist is not None:  # rank 0's estimate decides early stopping on every rank
            loss = distributed.broadcast(loss, device)
        report(step, {"val_loss_estimate": loss})
        return loss

    def stop_requested() -> bool:
        wanted = should_stop is not None and should_stop()
        return bool(distributed.broadcast(float(wanted), device)) if dist is not None else wanted

    done, stopped_early = start, False
    for step in range(start, cfg.max_steps):
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for micro in range(cfg.grad_accumulation):
            window, continues = sampler.next()  # (B, T + 1)
            last = micro == cfg.grad_accumulation - 1
            with score.no_sync() if dist is not None and not last else nullcontext():  # all-reduce once per step
                with amp():
                    nll, count, new_state = score(window.to(device), carry if continues else None, sampler.generator)
                loss = nll / count / cfg.grad_accumulation  # the model's own objective, averaged over micro-batches
                loss.backward()
            loss_value += loss.item()
            carry = detach_state(new_state)
        if dist is not None:
            loss_value = distributed.mean(loss_value, device)  # the global batch's loss, the same on every rank
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            bad_steps += 1  # skip the update: the weights stay at the last good values
            carry = None
            if bad_steps >= cfg.max_nonfinite_steps:
                raise TrainingError(
                    f"non-finite loss or gradient norm on {bad_steps} steps (train.max_nonfinite_steps), the last "
                    f"at step {step + 1} (loss {loss_value}, gradient norm {grad_norm}); the weights were not "
                    "updated on those steps and earlier checkpoints are intact. Lower train.learning_rate, use "
                    "precision fp32, or check the data"
                )
            continue
        optimizer.step()
        losses.append(loss_value)
        rates.append(tokens_per_step / (time.perf_counter() - t_step))
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            window_losses, rate = losses[-cfg.log_interval :], statistics.median(rates[-cfg.log_interval :])
            metrics = {
                "train_loss": sum(window_losses) / len(window_losses),
                "learning_rate": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_second": rate,
            }
            if flops_per_token:
                metrics["mfu"] = rate * flops_per_token / peak_flops
            report(done, metrics)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val_loss = validate(done)
            if val_loss < best["loss"]:
                best = {"loss": val_loss, "step": done, "evals_since": 0}
                if cfg.early_stopping_patience:
                    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if checkpoint_dir is not None and main:
                        save_checkpoint(Path(checkpoint_dir) / "best", model, {"step": done, "val_loss": val_loss})
            else:
                best["evals_since"] += 1
            if cfg.early_stopping_patience and best["evals_since"] >= cfg.early_stopping_patience:
                stopped_early = done < cfg.max_steps
                break
        if checkpoint_dir is not None and cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0:
            checkpoint(done)
        if done < cfg.max_steps and stop_requested():
            if checkpoint_dir is not None:
                checkpoint(done)
            raise TrainingInterrupted(
                done, Path(checkpoint_dir) / f"{STEP_PREFIX}{done:08d}" if checkpoint_dir else None
            )

    if stopped_early and best_weights is not None:
        model.load_state_dict(best_weights)
        val_loss = best["loss"]
    wall = time.perf_counter() - t0
    checkpoint = None
    if checkpoint_dir is not None and main:
        final = {"step": done, "val_loss_estimate": val_loss, "best_step": best["step"], **(checkpoint_state or {})}
        checkpoint = save_checkpoint(Path(checkpoint_dir) / "final", model, final)
        prune_checkpoints(checkpoint_dir, 0)  # finished: the resumable step checkpoints have served
        shutil.rmtree(Path(checkpoint_dir) / "best", ignore_errors=True)
    steady = rates[min(len(rates) - 1, 5) :] if rates else [0.0]  # skip warm-up steps
    return TrainResult(
        steps=done,
        train_loss=losses[-1] if losses else float("nan"),
        val_loss=val_loss,
        wall_seconds=wall,
        tokens_per_second=statistics.median(steady),
        checkpoint=checkpoint,
        best_step=best["step"],
        stopped_early=stopped_early,
    )


def _weights_of(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The verified weights saved in ``directory``, as a state dict for ``model`` (model left unchanged)."""
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_checkpoint(directory, model)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(current)
    return saved
