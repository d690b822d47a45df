"""Does pretraining transfer? Fine-tuned vs from-scratch classifiers on the built-in genre task.

  python bench/finetune.py                 # run the language models, then the four classifiers, then the table
  python bench/finetune.py --no-run        # only the table, from the runs already in ./mlruns

Runs (each with `lmp run`, in the current directory): `shakespeare-encoder` and `shakespeare-char-gpt`
(the registered language models the fine-tuned classifiers start from; skipped when their @champion
exists), then `shakespeare-genre-from-encoder`, `shakespeare-genre-scratch`, `shakespeare-genre-from-gpt`
and `shakespeare-genre-gpt-scratch` — same data, head and training budget in each pair. Prints a
markdown table of the newest finished run of each: validation macro-F1, accuracy and the majority-class
baseline on the same split.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

PAIRS = [
    ("shakespeare-genre-from-encoder", "shakespeare-encoder"),
    ("shakespeare-genre-scratch", None),
    ("shakespeare-genre-from-gpt", "shakespeare-char-gpt"),
    ("shakespeare-genre-gpt-scratch", None),
]


def lmp(*args: str) -> None:
    exe = shutil.which("lmp") or str(Path(sys.executable).with_name("lmp"))
    subprocess.run([exe, *args], check=True)


def has_champion(client, name: str) -> bool:
    try:
        client.get_model_version_by_alias(name, "champion")
        return True
    except Exception:  # noqa: BLE001 — no such model or alias
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only print the table from existing runs")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking

    tracking.configure(Path.cwd())
    client = MlflowClient()
    if not args.no_run:
        for _, lm in PAIRS:
            if lm and not has_champion(client, lm):
                lmp("run", lm)
        for name, _ in PAIRS:
            lmp("run", name)
    print("| pipeline | initialised from | val macro-F1 | val accuracy | majority macro-F1 | majority accuracy "
          "| train s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, _ in PAIRS:
        runs = mlflow.search_runs(
            experiment_names=[name], filter_string="attributes.status = 'FINISHED'", order_by=["start_time DESC"]
        )
        if runs.empty:
            print(f"| {name} | (no finished run) | | | | | |")
            continue
        r = runs.iloc[0]
        m = lambda key, r=r: r.get(f"metrics.{key}", float("nan"))  # noqa: E731
        print(
            f"| {name} | {r.get('tags.lmp.init_model') or 'scratch'} | {m('val_macro_f1'):.4f} | "
            f"{m('val_label_accuracy'):.4f} | {m('val_baseline_macro_f1'):.4f} | "
            f"{m('val_baseline_label_accuracy'):.4f} | {m('wall_seconds'):.0f} |"
        )


if __name__ == "__main__":
    main()
