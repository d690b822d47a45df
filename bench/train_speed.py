"""Training throughput of a pipeline's model: tokens/s and MFU for fp32 and bf16, against the matmul
peak measured in the same process.

  python bench/train_speed.py shakespeare-char-gpt --steps 10

Synthetic token batches of the pipeline's shape (batch_size × context_length); the optimizer step is
included. Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from flows.config import load_pipelines
from lm.models import build_model
from lm.training import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n×n matmul in ``dtype`` (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def tokens_per_second(spec, precision: str, steps: int, vocab_size: int = 81) -> tuple[float, float]:
    """Median tokens/s over ``steps`` training steps, and the model's FLOPs per token."""
    torch.manual_seed(0)
    model = build_model(spec.model, vocab_size)
    opt = make_optimizer(model, spec.train, torch.device("cpu"))
    batch = torch.randint(0, vocab_size, (spec.train.batch_size, spec.model.context_length + 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return batch[:, 1:].numel() / statistics.median(times), model.flops_per_token()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", nargs="?", default="shakespeare-char-gpt")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    spec = load_pipelines(ROOT / "pipelines.yaml").get(args.pipeline)
    rows = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(dtype)
        rate, flops = tokens_per_second(spec, precision, args.steps)
        rows.append((precision, rate, peak / 1e9, flops * rate / peak))
    width = getattr(spec.model, "hidden_dim", spec.model.embed_dim)
    print(
        f"\n{args.pipeline}: {spec.model.kind} {spec.model.num_layers}×{width}, context {spec.model.context_length}, "
        f"batch {spec.train.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'precision':<10}{'tokens/s':>10}{'peak GFLOP/s':>14}{'MFU':>8}")
    for precision, rate, peak, mfu in rows:
        print(f"{precision:<10}{rate:>10,.0f}{peak:>14,.0f}{mfu:>8.1%}")


if __name__ == "__main__":
    main()
