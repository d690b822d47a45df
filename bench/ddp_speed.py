"""Training throughput with 1 process vs N data-parallel processes (torchrun, gloo on CPU).

  python bench/ddp_speed.py shakespeare-char-gpt --nproc 2 --steps 60

Trains the pipeline's model on its tokens (prepared once, not timed) for ``--steps`` steps with the
same global batch: once in this process (all cores to one process), once under
``torchrun --nproc-per-node N`` (torchrun gives each process ``OMP_NUM_THREADS=1`` unless set). Prints
the median tokens/s of the steady steps (the first 5 skipped) for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def prepare(pipeline: str) -> tuple[dict, dict]:
    from flows.config import load_pipelines
    from lm import stages

    spec = load_pipelines("pipelines.yaml").get(pipeline)
    root = Path(tempfile.gettempdir()) / "lmp-bench-ddp"
    ctx = spec.model.context_length
    corpus = stages.ingest(spec.data, root / "data", base_dir=Path.cwd(), context_length=ctx)
    tokens = stages.tokenize(corpus, spec.tokenizer, root / "tokens", context_length=ctx)
    return spec.model_dump(mode="json"), tokens.model_dump(mode="json")


def train(spec_json: dict, tokens: dict, steps: int) -> float:
    """Median tokens/s (rank 0's, global) of ``steps`` steps in this process (or this rank)."""
    import torch.distributed as dist

    from flows.config import validate_spec
    from flows.ddp_worker import from_environment
    from lm import stages
    from lm.results import TokenShards

    spec = validate_spec(spec_json)
    ctx = from_environment()
    if ctx is not None:
        dist.init_process_group("gloo")
    cfg = spec.train.model_copy(update={"max_steps": steps, "eval_interval": 10**6, "log_interval": 1,
                                        "checkpoint_interval": 0, "distributed": None})  # fmt: skip
    rates: list[float] = []
    sink = lambda step, metrics: rates.append(metrics["tokens_per_second"]) if "tokens_per_second" in metrics else None  # noqa: E731
    with tempfile.TemporaryDirectory() as out:
        stages.fit(TokenShards.model_validate(tokens), spec.model, cfg, Path(out), on_metrics=sink, dist=ctx)
    if ctx is not None:
        dist.destroy_process_group()
    return statistics.median(rates[5:]) if rates else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default="shakespeare-char-gpt")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one rank under torchrun
        job = json.loads(Path(args.worker).read_text())
        rate = train(job["spec"], job["tokens"], job["steps"])
        if os.environ.get("RANK", "0") == "0":
            Path(job["result"]).write_text(str(rate))
        return
    spec, tokens = prepare(args.pipeline)
    single = train(spec, tokens, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"spec": spec, "tokens": tokens, "steps": args.steps, "result": f"{tmp}/rate"}))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.nproc), __file__, "--worker", str(job)], check=True)  # fmt: skip
        multi = float(Path(f"{tmp}/rate").read_text())
    threads = os.environ.get("OMP_NUM_THREADS", "1 (torchrun's default)")
    print(f"| {args.pipeline} | 1 process | {single:,.0f} tokens/s |")
    print(f"| {args.pipeline} | {args.nproc} processes (gloo, OMP_NUM_THREADS={threads}) | {multi:,.0f} tokens/s "
          f"| {multi / single:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
