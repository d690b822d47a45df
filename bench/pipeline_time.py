"""Time-to-quality of a whole `lmp run`: wall time, when validation loss first reached a target, speed.

Runs `lmp run PIPELINE` in a scratch directory (its own embedded stores), then reads the MLflow run:
  python bench/pipeline_time.py shakespeare-char-gpt --target 1.8 --repeats 1
Prints a table last. The periodic `val_loss_estimate` (first eval_tokens of the validation split) is
what the time-to-target uses; `val_loss` is the final full-split figure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(pipeline: str, target: float) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    scratch = Path(tempfile.mkdtemp(prefix="lmp-bench-"))
    try:
        shutil.copy(ROOT / "pipelines.yaml", scratch / "pipelines.yaml")
        lmp = Path(sys.executable).with_name("lmp")
        started = time.time()
        subprocess.run([str(lmp), "run", pipeline], cwd=scratch, check=True, capture_output=True)
        wall = time.time() - started
        mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlruns' / 'mlflow.db'}")
        client = MlflowClient()
        run = client.search_runs([client.get_experiment_by_name(pipeline).experiment_id])[0]
        history = client.get_metric_history(run.info.run_id, "val_loss_estimate")
        hit = next((m for m in sorted(history, key=lambda m: m.step) if m.value <= target), None)
        return {
            "wall_s": wall,
            "time_to_target_s": (hit.timestamp / 1000 - started) if hit else float("nan"),
            "val_loss": run.data.metrics["val_loss"],
            "val_bpc": run.data.metrics["val_bpc"],
            "tokens_per_s": run.data.metrics["tokens_per_second"],
            "train_s": run.data.metrics["wall_seconds"],
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", nargs="?", default="shakespeare-char-gpt")
    parser.add_argument("--target", type=float, default=1.8, help="validation loss target (nats/token)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = [one_run(args.pipeline, args.target) for _ in range(args.repeats)]
    print(f"\n{args.pipeline}: median of {len(runs)} run(s), target val loss {args.target}")
    print(f"{'metric':<20}{'value':>12}")
    for key in runs[0]:
        print(f"{key:<20}{statistics.median(r[key] for r in runs):>12.3f}")


if __name__ == "__main__":
    main()
