"""One rank of a distributed train task: ``torchrun … -m flows.ddp_worker JOB.json``.

The train task writes the job (the spec, the tokens or examples to read, the run directory, the MLflow
run, the checkpoint to resume from) and launches ``torchrun`` with it. Every rank trains its share of
each global batch; rank 0 alone reports metrics to the MLflow run, writes the checkpoints and, at the
end, ``result.json`` — which the task reads back. ``@record`` makes torchrun report a failing rank's
traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main(job_path: str) -> None:
    import torch
    import torch.distributed as dist

    from flows import tasks, tracking
    from flows.config import validate_spec
    from flows.resume import STOP
    from flows.torchrun import Job
    from lm import distributed
    from lm.atomic import atomic_write_bytes
    from lm.results import Init
    from lm.runtime import resolve_device

    job = Job.model_validate_json(Path(job_path).read_text(encoding="utf-8"))
    spec = validate_spec(job.spec)
    task = tasks.task_of(spec)
    encoded = task.encoded_type.model_validate(job.encoded)
    init = Init.model_validate(job.init) if job.init else None
    ctx = from_environment()
    device = resolve_device(spec.train.device, local_rank=ctx.local_rank)  # no CUDA context before set_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ctx is not None and ctx.world_size > int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)):
        use_interface_towards_master()
    dist.init_process_group(distributed.resolve_backend(spec.train.distributed.backend, device))
    try:
        tracking.configure_uri(job.tracking_uri)
        resume = Path(job.resume_from) if job.resume_from else None
        hooks = {"dist": ctx, "peak_flops": job.peak_flops, "resume_from": resume, "should_stop": STOP.requested}
        with STOP.handling():  # SIGTERM from torchrun (a stop request): rank 0 checkpoints, every rank stops
            if not ctx.is_main:
                task.fit(encoded, init, Path(job.out), on_metrics=lambda step, metrics: None, **hooks)
                return
            with tracking.MetricSink(job.run_id, resuming=job.replaying, buffer_dir=job.out) as sink:
                hooks["should_stop"] = lambda: STOP.requested() or sink.should_stop()
                on_start = None if resume else (lambda card: tracking.log_params(job.run_id, card))
                flush = lambda step: sink.flush()  # noqa: E731 — metrics up to a checkpoint are durable before it
                trained = task.fit(
                    encoded, init, Path(job.out), on_metrics=sink, on_start=on_start, before_checkpoint=flush, **hooks
                )
        atomic_write_bytes(Path(job.out) / "result.json", trained.model_dump_json().encode())
    finally:
        dist.destroy_process_group()


def use_interface_towards_master() -> None:
    """Ranks on several hosts: gloo's sockets on the interface that reaches the rendezvous (``MASTER_ADDR``), not
    on the hostname's address (often a loopback one); ``GLOO_SOCKET_IFNAME`` set by the user wins."""
    from lm.distributed import interface_towards

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    name = interface_towards(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def from_environment():
    """The ``lm.distributed.DistContext`` torchrun describes in the environment (None with one process)."""
    from lm.distributed import DistContext

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


if __name__ == "__main__":
    main(sys.argv[1])
