"""Generation speed: KV cache (GPT) / carried state (LSTM) against recomputing the window every token.

  python bench/generation_speed.py shakespeare-char-gpt shakespeare-char-lstm --new-tokens 256
  python bench/generation_speed.py shakespeare-char-gpt --context 256

Freshly initialised weights of each pipeline's model (speed does not depend on training), vocabulary 81,
a 7-token prompt, greedy decoding, 2 threads, fp32; median of ``--repeats``. Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from flows.config import load_pipelines
from lm.generation import generate
from lm.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def seconds(model, use_cache: bool, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(model, [1, 2, 3, 4, 5, 6, 7], max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", default=["shakespeare-char-gpt", "shakespeare-char-lstm"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, help="override the models' context_length (e.g. 256)")
    args = parser.parse_args()
    specs = load_pipelines(ROOT / "pipelines.yaml")
    rows = []
    for name in args.pipelines:
        torch.manual_seed(0)
        cfg = specs.get(name).model
        if args.context:
            cfg = cfg.model_copy(update={"context_length": args.context})
        model = build_model(cfg, 81).eval()
        seconds(model, True, 8, 1)  # warm-up
        cached, recomputed = (seconds(model, c, args.new_tokens, args.repeats) for c in (True, False))
        rows.append((name, model.context_length, cached, recomputed))
    print(f"\n{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'pipeline':<24}{'context':>8}{'cached s':>10}{'recompute s':>13}{'tokens/s cached':>17}{'speed-up':>10}")
    for name, ctx, cached, recomputed in rows:
        print(
            f"{name:<24}{ctx:>8}{cached:>10.3f}{recomputed:>13.3f}{args.new_tokens / cached:>17,.0f}"
            f"{recomputed / cached:>9.1f}×"
        )


if __name__ == "__main__":
    main()
