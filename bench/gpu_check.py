"""The CUDA path checked on a real GPU: bf16 autocast against fp32, exact resume, and DDP over nccl.

Two halves, because the GPU machine has no network and none of our orchestration stack:

  python bench/gpu_check.py --prepare .gpu          # here: ingest + tokenize the default pipeline once
  python3 bench/gpu_check.py --run .gpu --out DIR    # on the GPU machine (torch, pydantic, pyyaml only)

``--run`` trains the default pipeline's model (the same ``lm.stages.fit`` that `lmp run` calls) on CUDA
and writes ``DIR/gpu_check.json``:
- ``precision``: fp32 vs bf16 autocast for ``--steps`` steps: median tokens/s, wall time, final
  validation estimate (nats/token), so the bf16 speed-up and its (lack of) cost in loss are one table;
- ``resume``: a bf16 run checkpointed half-way and resumed from there, compared weight by weight with
  the uninterrupted run (bit-identical on CPU; on CUDA the kernels' summation order decides);
- ``ddp``: the same run as one torchrun rank over nccl (DistributedDataParallel around the objective),
  against the plain single-process run, and whether two ranks on the one GPU can start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(where: Path, pipeline: str) -> None:
    from flows.config import load_pipelines
    from lm import stages

    spec = load_pipelines("pipelines.yaml").get(pipeline)
    ctx = spec.model.context_length
    corpus = stages.ingest(spec.data, where / "data", base_dir=Path.cwd(), context_length=ctx)
    tokens = stages.tokenize(corpus, spec.tokenizer, where / "tokens", context_length=ctx)
    tokens = tokens.model_dump(mode="json")
    job = {"spec": spec.model_dump(mode="json"), "tokens": tokens, "root": str(where.resolve())}
    (where / "job.json").write_text(json.dumps(job, indent=2))
    print(f"prepared {where}/job.json: {pipeline}, tokens under {where / 'tokens'}")


def _job(where: Path) -> dict:
    """The prepared job, its absolute paths rewritten to wherever the folder is now."""
    text = (where / "job.json").read_text()
    job = json.loads(text)
    return json.loads(text.replace(job["root"], str(where.resolve())))


def fit(job: dict, out: Path, *, steps: int, precision: str, dist=None, resume_from: Path | None = None,
        stop_at: int | None = None) -> dict:  # fmt: skip
    """One training run on CUDA; the median tokens/s of the steady steps and the last validation estimate."""
    from flows.config import validate_spec
    from lm import stages
    from lm.results import TokenShards
    from lm.training import TrainingInterrupted

    spec = validate_spec(job["spec"])
    cfg = spec.train.model_copy(update={
        "max_steps": steps, "eval_interval": steps, "log_interval": 1, "checkpoint_interval": 0,
        "keep_checkpoints": 4, "distributed": None, "device": "cuda", "precision": precision,
    })  # fmt: skip
    rates, vals = [], []

    done = [0]

    def sink(step: int, metrics: dict) -> None:
        done[0] = step
        if "tokens_per_second" in metrics:
            rates.append(metrics["tokens_per_second"])
        if "val_loss_estimate" in metrics:
            vals.append(metrics["val_loss_estimate"])

    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    stop = (lambda: done[0] >= stop_at) if stop_at else None  # the real stop path: checkpoint, then raise
    try:
        tokens = TokenShards.model_validate(job["tokens"])
        result = stages.fit(tokens, spec.model, cfg, out, on_metrics=sink, dist=dist, resume_from=resume_from,
                            should_stop=stop)  # fmt: skip
    except TrainingInterrupted as e:
        return {"stopped_at": e.step, "checkpoint": str(e.checkpoint)}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "precision": precision,
        "wall_seconds": round(seconds, 2),
        "median_tokens_per_second": round(statistics.median(rates[10:] or rates)) if rates else None,
        "tokens_per_second_wall": round(steps * cfg.batch_size * spec.model.context_length / seconds),
        "val_loss_estimate": vals[-1] if vals else None,
        "train_loss": result.train_loss,
        "checkpoint": result.checkpoint,
    }


def same_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return {"bit_identical": all(wa[k].equal(wb[k]) for k in wa), "max_abs_difference": worst}


def deterministic() -> bool:
    """``GPU_CHECK_DETERMINISTIC=1``: deterministic CUDA kernels (cuBLAS workspace pinned), to tell a resume
    bug from kernel nondeterminism."""
    import torch

    if os.environ.get("GPU_CHECK_DETERMINISTIC") != "1":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    return True


def ddp_worker(job_path: Path, out: Path, steps: int) -> None:
    """One rank under torchrun: nccl process group, DistContext even for one rank (the DDP code path)."""
    import torch
    import torch.distributed as dist

    from lm.distributed import DistContext, resolve_backend

    deterministic()
    backend = resolve_backend("auto", torch.device("cuda"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.cuda.set_device(local)
    dist.init_process_group(backend)
    ctx = DistContext(rank, world, local)
    result = fit(_job(job_path.parent), out / f"rank{rank}", steps=steps, precision="bf16", dist=ctx)
    dist.destroy_process_group()
    if rank == 0:
        (out / "ddp.json").write_text(json.dumps(result | {"backend": backend, "world_size": world}))


def torchrun(here: Path, out: Path, steps: int, nproc: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--ddp-worker", str(here / "job.json"), "--out", str(out), "--steps", str(steps)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"world_size": nproc, "failed": (done.stderr or done.stdout)[-1500:]}
    return json.loads((out / "ddp.json").read_text())


def run(here: Path, out: Path, steps: int) -> None:
    import torch

    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "nccl_available": torch.distributed.is_nccl_available(),
    }
    a = torch.randn(8192, 8192, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        for _ in range(3):
            x @ x
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            x @ x
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        report[f"matmul_tflops_{str(dtype).split('.')[-1]}"] = round(10 * 2 * 8192**3 / seconds / 1e12)
    del a, x
    report["deterministic"] = deterministic()
    job = _job(here)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fit(job, tmp / "warm-up", steps=20, precision="fp32")  # CUDA context, cuBLAS handles: not in the timings
        report["precision"] = {p: fit(job, tmp / p, steps=steps, precision=p) for p in ("fp32", "bf16")}
        print(json.dumps(report, indent=2), flush=True)
        half = steps // 2
        whole = report["precision"]["bf16"]
        again = fit(job, tmp / "again", steps=steps, precision="bf16")
        report["repeat"] = same_weights(Path(whole["checkpoint"]), Path(again["checkpoint"]))
        stopped = fit(job, tmp / "stopped", steps=steps, precision="bf16", stop_at=half)
        resumed = fit(job, tmp / "stopped", steps=steps, precision="bf16", resume_from=Path(stopped["checkpoint"]))
        report["resume"] = {"stopped_at": stopped["stopped_at"], "whole_val": whole["val_loss_estimate"],
                            "resumed_val": resumed["val_loss_estimate"]}  # fmt: skip
        report["resume"] |= same_weights(Path(whole["checkpoint"]), Path(resumed["checkpoint"]))
        single = report["precision"]["bf16"]
        one = torchrun(here, tmp / "ddp1", steps, 1)
        report["ddp"] = {"single_process_val": single["val_loss_estimate"], "one_rank_nccl": one}
        if "checkpoint" in one:
            report["ddp"]["weights_vs_single"] = same_weights(Path(single["checkpoint"]), Path(one["checkpoint"]))
        if not report["deterministic"]:
            report["ddp"]["two_ranks_one_gpu_nccl"] = torchrun(here, tmp / "ddp2", min(steps, 100), 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="here: ingest + tokenize into this folder")
    parser.add_argument("--pipeline", default="shakespeare-char-gpt")
    parser.add_argument("--run", type=Path, help="on the GPU machine: the prepared folder")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.pipeline)
    elif args.ddp_worker:
        ddp_worker(args.ddp_worker, args.out, args.steps)
    elif args.run:
        run(args.run, args.out, args.steps)
    else:
        parser.error("pass --prepare DIR (here) or --run DIR (on the GPU machine)")


if __name__ == "__main__":
    main()
