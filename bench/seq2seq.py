"""Seq2seq: fine-tuned vs from-scratch vs the baseline on the built-in tasks, and encoder–decoder vs decoder.

  python bench/seq2seq.py              # the language models (when not registered yet), the seq2seq pipelines, the table
  python bench/seq2seq.py --no-run     # only the table, from the runs already in ./mlruns

Runs (each with `lmp run`, in the current directory): `shakespeare-char-gpt`, `shakespeare-encoder` and
`shakespeare-bpe-gpt` (skipped when their @champion exists), then every pipeline in ``TASKS``. Prints a markdown
table of the newest finished run of each: the application's headline metric on validation and test, the
baseline on the same splits (copy the source; the most frequent training answer), the loss on target tokens,
training and whole-run wall time.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from finetune import has_champion, lmp  # bench/ is the script's directory

LANGUAGE_MODELS = ("shakespeare-char-gpt", "shakespeare-encoder", "shakespeare-bpe-gpt")
TASKS = {  # pipeline → the headline metric of its application
    "names-en-fr-from-gpt": "chrf",
    "names-en-fr-encdec": "chrf",
    "names-en-fr-scratch": "chrf",
    "docstrings-from-gpt": "rougeL",
    "docstrings-scratch": "rougeL",
    "speakers-qa-from-gpt": "exact_match",
    "speakers-qa-scratch": "exact_match",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only print the table from existing runs")
    parser.add_argument("pipelines", nargs="*", help="run only these (default: all of TASKS)")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    tracking.configure(Path.cwd())
    client = MlflowClient()
    if not args.no_run:
        for name in LANGUAGE_MODELS:
            if not has_champion(client, name):
                lmp("run", name)
        for name in args.pipelines or TASKS:
            lmp("run", name)
    print("| pipeline | initialised from | metric | val | test | baseline val | baseline test | val target loss "
          "| train s | run s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, metric in TASKS.items():
        runs = mlflow.search_runs(
            experiment_names=[name], filter_string="attributes.status = 'FINISHED'", order_by=["start_time DESC"]
        )
        if runs.empty:
            print(f"| {name} | (no finished run) | {metric} | | | | | | | |")
            continue
        r = runs.iloc[0]
        m = lambda key, r=r: r.get(f"metrics.{key}", math.nan)  # noqa: E731
        source = r.get("tags.lmp.init_model") or "scratch"
        if isinstance(r.get("tags.lmp.encoder_model"), str):
            source += f" + {r['tags.lmp.encoder_model']}"
        run_s = (r["end_time"] - r["start_time"]).total_seconds()
        print(
            f"| {name} | {source} | {metric} | {m('val_' + metric):.2f} | {m('test_' + metric):.2f} | "
            f"{m('val_baseline_' + metric):.2f} | {m('test_baseline_' + metric):.2f} | {m('val_target_loss'):.3f} | "
            f"{m('wall_seconds'):.0f} | {run_s:.0f} |"
        )


if __name__ == "__main__":
    main()
