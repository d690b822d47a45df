"""Data-parallel training across processes (``torchrun``): what the one training loop needs to know.

Every rank builds the same model from the same seed and draws the same *global* batch positions; each
reads only its rows of that batch (``rows``), so N ranks with ``batch_size / N`` rows each see exactly
the batch one process would. ``DistributedDataParallel`` averages the gradients, so the update — and the
loss after K steps — matches the single-process run up to floating-point summation order. Rank 0 alone
validates, reports metrics and writes checkpoints; decisions it makes (stop, early stop, the validation
value) are broadcast so every rank takes the same branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (the torchrun worker, ``flows/ddp_worker.py``, reads it from torchrun's
    environment and passes it in)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def resolve_backend(choice: str, device: torch.device) -> str:
    """`auto`: nccl for CUDA, gloo for CPU."""
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def interface_towards(host: str, port: int) -> str | None:
    """The name of this machine's network interface that traffic to ``host`` leaves from (None if none is found).

    Gloo binds each rank to the address of the machine's hostname unless ``GLOO_SOCKET_IFNAME`` names an interface,
    and a hostname often resolves to a loopback address (``127.0.1.1`` in Debian's /etc/hosts): the ranks of the
    other hosts are then told to connect to their own loopback. The interface that reaches the rendezvous address
    is one every host reaches. A UDP ``connect`` only picks the route and source address; it sends nothing."""
    import socket

    import psutil

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(address)
            local = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == family and a.address.split("%")[0] == local for a in addresses):
            return name
    return None


class Objective(nn.Module):
    """``forward`` = the model's training objective, so ``DistributedDataParallel`` (which synchronises
    gradients through ``forward``) can wrap ``model.score``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, window, state=None, generator=None):
        return self.model.score(window, state, generator)


def wrap(model: nn.Module, ctx: DistContext, device: torch.device):
    """``model.score`` behind DDP (gradients averaged over ranks on backward)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    # The model says whether some parameters get no gradient (a classifier's backbone LM head, frozen layers).
    return DistributedDataParallel(Objective(model), device_ids=ids, find_unused_parameters=model.unused_parameters)


def mean(value: float, device: torch.device) -> float:
    """The mean of a scalar over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast(value: float, device: torch.device) -> float:
    """Rank 0's value of a scalar, on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def gather_rows(state, world_size: int):
    """A carried recurrent state — tensors with the batch in dimension 1, like an LSTM's (h, c) — of every
    rank, joined in rank order (the whole global batch's state, for a checkpoint)."""
    if state is None:
        return None
    joined = []
    for t in state if isinstance(state, (tuple, list)) else (state,):
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        joined.append(torch.cat(parts, dim=1))
    return tuple(joined)


def gather_rng(device: torch.device) -> list[torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ per rank), gathered on every rank."""
    state = torch.get_rng_state().to(device)
    states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(states, state)
    return [s.cpu() for s in states]
