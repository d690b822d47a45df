"""Where and at what precision training and evaluation run, resolved once from the ``TrainConfig``.

``resolve_runtime(cfg)`` turns the configured choices (``device: auto|cpu|cuda``, ``precision:
auto|fp32|bf16``) into a ``Runtime``: the torch device and the autocast dtype (None: plain fp32).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lm.config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot continue (for example: the loss stayed non-finite, or no CUDA device exists)."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    """The autocast dtype (None means plain fp32)."""

    def autocast(self) -> AbstractContextManager:
        """A fresh autocast context at this precision (a no-op context for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


def resolve_runtime(cfg: TrainConfig, *, local_rank: int | None = None) -> Runtime:
    """The device and autocast dtype ``cfg`` asks for; ``local_rank`` picks this process's GPU under torchrun."""
    device = resolve_device(cfg.device, local_rank=local_rank)
    return Runtime(device, resolve_precision(cfg.precision, device))


def resolve_device(choice: str, *, local_rank: int | None = None) -> torch.device:
    """``choice`` as a device (``cuda:local_rank`` when given one). Touches no CUDA context, so a torchrun
    worker can call it before ``torch.cuda.set_device``."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
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
