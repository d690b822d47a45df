"""Time-to-quality of a whole `lmp run`: wall time, when validation loss first reached a target, speed.

Runs `lmp run PIPELINE` twice in a fresh scratch directory — "cold" (new MLflow database, nothing
cached) then "warm" (the database exists, ingest and tokenize are cached) — and reads the MLflow runs:
  python bench/pipeline_time.py shakespeare-quick-lstm --target 1.88 --repeats 3
Prints a table last (medians over repeats). ``wall_s`` is the whole process, start to exit.
``val_nats_per_char`` is the final full-split loss per character (for a char tokenizer it is
``val_loss``); ``time_to_target_s`` is when the periodic ``val_loss_estimate`` first reached the target.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(pipeline: str, target: float, scratch: Path) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    lmp = Path(sys.executable).with_name("lmp")
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # set_tracking_uri below exports it
    subprocess.run([str(lmp), "run", pipeline], cwd=scratch, env=env, check=True, capture_output=True)
    wall = time.time() - started
    mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name(pipeline).experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    history = client.get_metric_history(run.info.run_id, "val_loss_estimate")
    hit = next((m for m in sorted(history, key=lambda m: m.step) if m.value <= target), None)
    return {
        "wall_s": wall,
        "time_to_target_s": (hit.timestamp / 1000 - started) if hit else float("nan"),
        "val_nats_per_char": run.data.metrics["val_bpc"] * math.log(2),
        "val_bpc": run.data.metrics["val_bpc"],
        "tokens_per_s": run.data.metrics["tokens_per_second"],
        "train_s": run.data.metrics["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", nargs="?", default="shakespeare-char-gpt")
    parser.add_argument("--target", type=float, default=1.8, help="validation loss target (nats/token)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        scratch = Path(tempfile.mkdtemp(prefix="lmp-bench-"))
        try:
            shutil.copy(ROOT / "pipelines.yaml", scratch / "pipelines.yaml")
            for kind in runs:
                runs[kind].append(one_run(args.pipeline, args.target, scratch))
                print(kind, {k: round(v, 4) for k, v in runs[kind][-1].items()}, flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.pipeline}: median of {args.repeats} run(s) each, target val loss {args.target}")
    print(f"{'metric':<20}{'cold':>12}{'warm':>12}")
    for key in runs["cold"][0]:
        print(f"{key:<20}" + "".join(f"{statistics.median(r[key] for r in runs[k]):>12.3f}" for k in runs))


if __name__ == "__main__":
    main()
