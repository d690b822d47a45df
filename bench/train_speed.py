"""Training throughput of a pipeline's model: tokens/s and MFU in fp32 and bf16, eager and compiled.

  python bench/train_speed.py shakespeare-char-gpt shakespeare-char-lstm --steps 10

Synthetic token batches of the pipeline's shape (batch_size × context_length) through the model's own
training objective (``model.score``) with the optimizer step; ``--no-compile`` skips the
``torch.compile`` rows (each compiles for tens of seconds). MFU is against an n×n matmul peak measured
in the same process for the same dtype (``lm.perf.matmul_peak``). Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from flows.config import load_pipelines
from lm.models import build_model
from lm.perf import matmul_peak
from lm.training import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(spec, precision: str, steps: int, compiled: bool, vocab_size: int = 81) -> tuple[float, float]:
    """Median tokens/s over ``steps`` training steps (after warm-up), and seconds spent warming up
    (compilation included)."""
    torch.manual_seed(0)
    model = build_model(spec.model, vocab_size)
    opt = make_optimizer(model, spec.train, torch.device("cpu"))
    score = torch.compile(model.score) if compiled else model.score
    batch = torch.randint(0, vocab_size, (spec.train.batch_size, spec.model.context_length + 1))
    times, warm_up = [], 3
    t_warm = time.perf_counter()
    for i in range(steps + warm_up):
        if i == warm_up:
            t_warm = time.perf_counter() - t_warm
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            nll, count, _ = score(batch)
        opt.zero_grad(set_to_none=True)
        (nll / count).backward()
        opt.step()
        if i >= warm_up:
            times.append(time.perf_counter() - t)
    return spec.train.batch_size * spec.model.context_length / statistics.median(times), t_warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", default=["shakespeare-char-gpt", "shakespeare-char-lstm"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    specs = load_pipelines(ROOT / "pipelines.yaml")
    peaks = {p: matmul_peak("cpu", d) for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    rows = []
    for name in args.pipelines:
        spec = specs.get(name)
        flops = build_model(spec.model, 81).flops_per_token()
        for compiled in (False,) if args.no_compile else (False, True):
            for precision in ("fp32", "bf16"):
                rate, warm = tokens_per_second(spec, precision, args.steps, compiled)
                rows.append(
                    (name, "compiled" if compiled else "eager", precision, rate, warm, rate * flops / peaks[precision])
                )
                print(rows[-1], flush=True)
    print(
        f"\n{torch.get_num_threads()} threads, torch {torch.__version__}; matmul peak "
        + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
    )
    print(f"{'pipeline':<24}{'mode':<10}{'precision':<10}{'tokens/s':>10}{'warm-up s':>11}{'MFU':>8}")
    for name, mode, precision, rate, warm, mfu in rows:
        print(f"{name:<24}{mode:<10}{precision:<10}{rate:>10,.0f}{warm:>11.1f}{mfu:>8.1%}")


if __name__ == "__main__":
    main()
