"""Exports of registered versions: how long `lmp export` takes, how close the export is, and ONNX Runtime's
forward pass against PyTorch's.

  python bench/export.py models:/shakespeare-char-gpt@champion models:/seed-word-lstm@champion

Run in the project (its embedded store). For each model and format (hf for GPTs, onnx for all): the export's wall
time in this process (imports of transformers/onnx excluded: the first export pays them, so one warm-up export
runs first), the export's own check (max |logit difference| against our model), then the median over
``--repeats`` of one forward pass at batch 1 × the model's context, 2 threads, fp32, PyTorch vs ONNX Runtime.
Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["models:/shakespeare-char-gpt@champion"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from flows.registry.export import export_package
    from flows.registry.register import download_package, resolve_init
    from lm import package as packaging

    tracking.configure_project()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for uri in args.models:
            version = resolve_init(uri, MlflowClient(), what="bench")
            found = download_package(version.name, version.version, scratch / f"{version.name}-v{version.version}")
            formats = (["hf"] if packaging.read_config(found)["model"]["kind"] == "gpt" else []) + ["onnx"]
            for fmt in formats:
                export_package(found, fmt, scratch / f"warm-up-{len(rows)}-{fmt}", {})  # pays the imports
                out = scratch / f"{len(rows)}-{fmt}"
                t = time.perf_counter()
                done = export_package(found, fmt, out, {})
                rows.append({"model": f"{version.name} v{version.version}", "format": fmt, "out": out,
                             "architecture": done.get("architecture"), "export_s": time.perf_counter() - t,
                             "difference": done.get("max_logit_difference"), "package": found})  # fmt: skip
        for row in rows:
            if row["format"] != "onnx":
                continue
            loaded = packaging.load(row["package"])
            model = loaded.model.float().eval()
            ids = torch.randint(0, loaded.config["vocab_size"], (1, model.context_length))
            feed = {"input_ids": ids.numpy()}
            if hasattr(model, "lstm"):
                state = np.zeros((model.cfg.num_layers, 1, model.cfg.hidden_dim), dtype=np.float32)
                feed |= {"h0": state, "c0": state}
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(str(row["out"] / "model.onnx"), options, providers=["CPUExecutionProvider"])
            with torch.no_grad():
                row["torch_ms"] = 1000 * median_seconds(lambda m=model, x=ids: m(x), args.repeats)
            row["ort_ms"] = 1000 * median_seconds(lambda s=session, f=feed: s.run(None, f), args.repeats)
            row["tokens"] = model.context_length
    print("| model | format | exported as | export (s) | max logit difference | forward, PyTorch (ms) "
          "| forward, ONNX Runtime (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        torch_ms = f"{r['torch_ms']:.1f} ({r['tokens']} tokens)" if "torch_ms" in r else ""
        ort_ms = f"{r['ort_ms']:.1f}" if "ort_ms" in r else ""
        print(f"| {r['model']} | {r['format']} | {r['architecture']} | {r['export_s']:.1f} | "
              f"{r['difference']:.2g} | {torch_ms} | {ort_ms} |")  # fmt: skip


if __name__ == "__main__":
    main()
