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
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lm import distributed
from lm.batches import TokenBatches
from lm.checkpoint import (
    STEP_PREFIX,
    load_checkpoint,
    load_tensors,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from lm.config import BatchSettings, TrainConfig
from lm.distributed import DistContext
from lm.errors import DataError
from lm.models.base import architecture
from lm.results import Trained
from lm.runtime import Runtime, TrainingError, resolve_runtime
from lm.timeline import mark

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
    opt = cfg.optimizer
    peak, floor = opt.learning_rate, opt.learning_rate * opt.min_lr_ratio
    if step < opt.warmup_steps:
        return peak * (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, opt.max_steps - opt.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optimizer.learning_rate, betas=(0.9, 0.95), fused=True)


class Sampler(Protocol):
    """Batches for the loop: ``next()`` → (batch with ``.to(device)``, whether row b continues row b of the
    previous batch). Its state is ``position`` (batches drawn) and ``generator``; ``rows`` selects this
    process's rows of each batch under data parallelism."""

    batch_size: int
    tokens_per_batch: int
    generator: torch.Generator
    position: int
    rows: slice

    def next(self) -> tuple[Any, bool]: ...


class TaskData(Protocol):
    """A task's split as the loop sees it: where batches come from and the periodic validation estimate
    (``lm.batches.TokenBatches`` for language models, ``lm.classification.batches.ExampleBatches`` …)."""

    def sampler(self, batches: BatchSettings, *, seed: int, context_length: int) -> Sampler: ...

    def estimate(self, model: nn.Module, *, batch_size: int, max_tokens: int, runtime: Runtime) -> float: ...


def task_data(data: TaskData | np.ndarray) -> TaskData:
    """``data``, a plain token array being a language model's (``TokenBatches``)."""
    return TokenBatches(data) if isinstance(data, np.ndarray) else data


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


def training_state(optimizer: torch.optim.Optimizer, sampler: Sampler) -> tuple[dict, dict]:
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


def restore_training_state(optimizer, sampler: Sampler, tensors: dict, meta: dict) -> None:
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
    train_data: TaskData | np.ndarray,
    val_data: TaskData | np.ndarray,
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

    ``train_data`` and ``val_data`` are the task's ``TaskData`` (batches to train on, the periodic
    validation estimate); a plain token array is a language model's (``lm.batches.TokenBatches``).
    The loss is the model's own ``score``. With ``dist`` (one rank of a ``torchrun`` job, process group
    initialised) the rank trains its rows of every global batch under DistributedDataParallel; rank 0
    alone reports, validates and checkpoints (see ``lm.distributed``).
    """
    hooks = _Hooks(on_metrics, checkpoint_state or {}, before_checkpoint, should_stop, peak_flops)
    run = _Training(model, task_data(train_data), task_data(val_data), cfg, hooks, checkpoint_dir, dist)
    if resume_from is not None:
        run.resume(Path(resume_from))
    return run.run()


@dataclass(frozen=True)
class _Hooks:
    on_metrics: MetricSink
    checkpoint_state: Mapping[str, object]
    before_checkpoint: Callable[[int], None] | None
    should_stop: Callable[[], bool] | None
    peak_flops: float | None


class _Training:
    """One ``train`` call: set-up, resume, steps, periodic evaluation and checkpoints, and the finish."""

    def __init__(self, model, train_data: TaskData, val_data: TaskData, cfg: TrainConfig, hooks: _Hooks,
                 checkpoint_dir: Path | None, dist: DistContext | None):  # fmt: skip
        self.model, self.val_data, self.cfg, self.hooks, self.dist = model, val_data, cfg, hooks, dist
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.runtime = resolve_runtime(cfg, local_rank=dist.local_rank if dist is not None else None)
        self.device = self.runtime.device
        self.main = dist is None or dist.is_main
        self.report = hooks.on_metrics if self.main else (lambda step, metrics: None)
        model.to(self.device).train()
        self.sampler = train_data.sampler(cfg.batches, seed=cfg.runtime.seed, context_length=model.context_length)
        self.optimizer = make_optimizer(model, cfg, self.device)
        self.score = self._objective()
        self.tokens_per_step = self.sampler.tokens_per_batch * cfg.batches.grad_accumulation
        self.flops_per_token = model.flops_per_token() if hooks.peak_flops else None
        self.rates: list[float] = []
        self.losses: list[float] = []
        self.carry = None  # recurrent state carried between stream windows
        self.val_loss, self.bad_steps, self.t0, self.start = float("nan"), 0, time.perf_counter(), 0
        self.best = {"loss": math.inf, "step": None, "evals_since": 0}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.done, self.stopped_early = 0, False

    def _objective(self):
        """``model.score``, behind DDP for one rank of a distributed job, compiled when asked."""
        score, dist, sampler = self.model.score, self.dist, self.sampler
        if dist is not None:
            if sampler.batch_size % dist.world_size:
                raise TrainingError(
                    f"train.batch_size ({sampler.batch_size}) must be divisible by the {dist.world_size} processes "
                    "so every rank reads an equal share of each global batch; change batch_size or nproc_per_node"
                )
            sampler.rows = dist.rows(sampler.batch_size)
            score = distributed.wrap(self.model, dist, self.device)
        return torch.compile(score) if self.cfg.runtime.compile else score

    def resume(self, resume_from: Path) -> None:
        """Weights, optimizer, RNGs, batch position, carried state and early-stopping record of a checkpoint."""
        dist = self.dist
        state = load_checkpoint(resume_from, self.model)
        tensors = load_tensors(resume_from)
        restore_training_state(self.optimizer, self.sampler, tensors, state["training"])
        if dist is not None and f"rng.torch.rank{dist.rank}" in tensors:  # each rank's own dropout stream
            torch.set_rng_state(tensors[f"rng.torch.rank{dist.rank}"])
        self.carry = tensors_state(tensors, self.device)
        if dist is not None and self.carry is not None:  # the checkpoint holds the whole batch's state: our rows
            self.carry = tuple(t[:, self.sampler.rows].contiguous() for t in self.carry)
        self.start, self.bad_steps = state["step"], state["training"].get("nonfinite_steps", 0)
        self.best = state["training"].get("best", self.best)
        best_dir = resume_from.parent / "best"
        if (
            self.cfg.cadence.early_stopping_patience
            and self.best["step"] is not None
            and (best_dir / "MANIFEST.json").exists()
        ):
            self.best_weights = {k: v.clone() for k, v in _weights_of(best_dir, self.model).items()}

    def run(self) -> TrainResult:
        self.done = self.start
        mark("first_step")
        for step in range(self.start, self.cfg.batches.max_steps):
            grad_norm = self._step(step)
            if grad_norm is None:  # skipped: non-finite
                continue
            self._log(grad_norm)
            if self._evaluate():
                break
            self._checkpoint_or_stop()
        mark("last_step")
        return self._finish()

    def _step(self, step: int) -> float | None:
        """One optimizer step; its gradient norm, or None when it was skipped for a non-finite value."""
        t_step = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = self._accumulate()
        if self.dist is not None:
            loss_value = distributed.mean(loss_value, self.device)  # the global batch's loss, the same on every rank
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._skip(step, loss_value, grad_norm)
            return None
        self.optimizer.step()
        self.losses.append(loss_value)
        self.rates.append(self.tokens_per_step / (time.perf_counter() - t_step))
        self.done = step + 1
        return grad_norm

    def _accumulate(self) -> float:
        """Forward and backward over ``grad_accumulation`` micro-batches; their summed (averaged) loss."""
        accumulation, loss_value = self.cfg.batches.grad_accumulation, 0.0
        for micro in range(accumulation):
            window, continues = self.sampler.next()  # (B, T + 1)
            last = micro == accumulation - 1
            with self.score.no_sync() if self.dist is not None and not last else nullcontext():  # all-reduce once
                with self.runtime.autocast():
                    nll, count, new_state = self.score(
                        window.to(self.device), self.carry if continues else None, self.sampler.generator
                    )
                loss = nll / count / accumulation  # the model's own objective, averaged over micro-batches
                loss.backward()
            loss_value += loss.item()
            self.carry = detach_state(new_state)
        return loss_value

    def _skip(self, step: int, loss_value: float, grad_norm: float) -> None:
        self.bad_steps += 1  # skip the update: the weights stay at the last good values
        self.carry = None
        if self.bad_steps >= self.cfg.cadence.max_nonfinite_steps:
            raise TrainingError(
                f"non-finite loss or gradient norm on {self.bad_steps} steps (train.max_nonfinite_steps), the last "
                f"at step {step + 1} (loss {loss_value}, gradient norm {grad_norm}); the weights were not "
                "updated on those steps and earlier checkpoints are intact. Lower train.learning_rate, use "
                "precision fp32, or check the data"
            )

    def _log(self, grad_norm: float) -> None:
        done, every = self.done, self.cfg.cadence.log_interval
        if done % every == 0 or done == self.cfg.batches.max_steps:
            window_losses, rate = self.losses[-every:], statistics.median(self.rates[-every:])
            metrics = {
                "train_loss": sum(window_losses) / len(window_losses),
                "learning_rate": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_second": rate,
            }
            if self.flops_per_token:
                metrics["mfu"] = rate * self.flops_per_token / self.hooks.peak_flops
            self.report(done, metrics)

    def _evaluate(self) -> bool:
        """The periodic validation estimate (keeping the best weights); True when early stopping ends the run."""
        done, cadence, max_steps = self.done, self.cfg.cadence, self.cfg.batches.max_steps
        if not (done % cadence.eval_interval == 0 or done == max_steps):
            return False
        self.val_loss = self._validate(done)
        if self.val_loss < self.best["loss"]:
            self.best = {"loss": self.val_loss, "step": done, "evals_since": 0}
            if cadence.early_stopping_patience:
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if self.checkpoint_dir is not None and self.main:
                    save_checkpoint(self.checkpoint_dir / "best", self.model, {"step": done, "val_loss": self.val_loss})
        else:
            self.best["evals_since"] += 1
        if cadence.early_stopping_patience and self.best["evals_since"] >= cadence.early_stopping_patience:
            self.stopped_early = done < max_steps
            return True
        return False

    def _validate(self, step: int) -> float:
        cfg = self.cfg
        loss = (
            self.val_data.estimate(
                self.model, batch_size=cfg.batches.batch_size, max_tokens=cfg.cadence.eval_tokens, runtime=self.runtime
            )
            if self.main
            else 0.0
        )
        if self.dist is not None:  # rank 0's estimate decides early stopping on every rank
            loss = distributed.broadcast(loss, self.device)
        self.report(step, {"val_loss_estimate": loss})
        return loss

    def _checkpoint_or_stop(self) -> None:
        """The periodic step checkpoint; on a stop request, a checkpoint and TrainingInterrupted."""
        done, directory, every = self.done, self.checkpoint_dir, self.cfg.cadence.checkpoint_interval
        if directory is not None and every and done % every == 0:
            self._checkpoint(done)
        if done < self.cfg.batches.max_steps and self._stop_requested():
            if directory is not None:
                self._checkpoint(done)
            raise TrainingInterrupted(done, directory / f"{STEP_PREFIX}{done:08d}" if directory else None)

    def _stop_requested(self) -> bool:
        wanted = self.hooks.should_stop is not None and self.hooks.should_stop()
        return bool(distributed.broadcast(float(wanted), self.device)) if self.dist is not None else wanted

    def _checkpoint(self, step: int) -> None:
        dist = self.dist
        ranks_rng = distributed.gather_rng(self.device) if dist is not None else []  # collectives: every rank
        whole_carry = distributed.gather_rows(self.carry, dist.world_size) if dist is not None else self.carry
        if not self.main:
            return
        if self.hooks.before_checkpoint is not None:
            self.hooks.before_checkpoint(step)
        tensors, meta = training_state(self.optimizer, self.sampler)
        tensors |= state_tensors(whole_carry) | {f"rng.torch.rank{k}": s for k, s in enumerate(ranks_rng)}
        meta |= {"nonfinite_steps": self.bad_steps, "best": self.best}
        state = {"step": step, "training": meta, **self.hooks.checkpoint_state}
        save_checkpoint(self.checkpoint_dir / f"{STEP_PREFIX}{step:08d}", self.model, state, tensors)
        prune_checkpoints(self.checkpoint_dir, self.cfg.cadence.keep_checkpoints)

    def _finish(self) -> TrainResult:
        """Best weights back (after early stopping), the final checkpoint, and the result."""
        if self.stopped_early and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
            self.val_loss = self.best["loss"]
        wall = time.perf_counter() - self.t0
        checkpoint = None
        if self.checkpoint_dir is not None and self.main:
            final = {"step": self.done, "val_loss_estimate": self.val_loss, "best_step": self.best["step"]}
            checkpoint = save_checkpoint(self.checkpoint_dir / "final", self.model, final | self.hooks.checkpoint_state)
            prune_checkpoints(self.checkpoint_dir, 0)  # finished: the resumable step checkpoints have served
            shutil.rmtree(self.checkpoint_dir / "best", ignore_errors=True)
        steady = self.rates[min(len(self.rates) - 1, 5) :] if self.rates else [0.0]  # skip warm-up steps
        return TrainResult(
            steps=self.done,
            train_loss=self.losses[-1] if self.losses else float("nan"),
            val_loss=self.val_loss,
            wall_seconds=wall,
            tokens_per_second=statistics.median(steady),
            checkpoint=checkpoint,
            best_step=self.best["step"],
            stopped_early=self.stopped_early,
        )


def _weights_of(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The verified weights saved in ``directory``, as a state dict for ``model`` (model left unchanged)."""
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_checkpoint(directory, model)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(current)
    return saved


def model_card(model: nn.Module) -> dict:
    """Sizes every run reports: parameters (tied output counted once) and training FLOPs per token,
    plus the training objective and the width of ``encode()`` features."""
    with torch.no_grad():
        feature_dim = model.encode(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    return {
        "architecture": architecture(model),
        "objective": model.objective,
        "feature_dim": int(feature_dim),
        "num_parameters": model.num_parameters(),
        "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
        "flops_per_token": model.flops_per_token(),
    }


def fit(
    build: Callable[[], nn.Module],
    data: Callable[[nn.Module], tuple[TaskData, TaskData]],
    cfg: TrainConfig,
    out_dir: Path,
    state: dict,
    *,
    card: Callable[[nn.Module], dict] = lambda model: {},
    on_start: Callable[[dict], None] | None = None,
    resume_from: Path | None = None,
    **hooks,
) -> Trained:
    """Every task's fit: build the model (seeded with ``cfg.seed``), show its card (``model_card`` plus the
    task's ``card``) to ``on_start``, read its training and validation data (``data`` checks they fit it), train
    (or resume from a step checkpoint) and write ``out_dir/final``. ``state`` is saved in every checkpoint and a
    resume from one whose state differs (another model, tokenizer, corpus, labels …) is refused, naming the
    keys. ``hooks``: ``train``'s keyword arguments (``on_metrics``, ``should_stop``, ``peak_flops``, ``dist`` …)."""
    torch.manual_seed(cfg.seed)
    model = build()
    sizes = model_card(model) | card(model)
    if on_start is not None:
        on_start(sizes)
    train_data, val_data = data(model)
    if resume_from is not None:
        saved = verify_checkpoint(resume_from)
        differing = sorted(k for k, v in state.items() if saved.get(k) != v)
        if differing:
            raise DataError(
                f"cannot resume from {resume_from}: its {', '.join(differing)} differ from this run's; "
                "pass --fresh to start over"
            )
    result = train(
        model, train_data, val_data, cfg, checkpoint_dir=Path(out_dir), checkpoint_state=state,
        resume_from=resume_from, **hooks,
    )  # fmt: skip
    return Trained(
        checkpoint=str(result.checkpoint),
        steps=result.steps,
        train_loss=result.train_loss,
        wall_seconds=result.wall_seconds,
        tokens_per_second=result.tokens_per_second,
        best_step=result.best_step,
        stopped_early=result.stopped_early,
        card=sizes,
    )
