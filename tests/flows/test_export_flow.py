"""Registered models leave home and come back: `lmp export`, a pipeline's `export:` and `init_from: hf:PATH`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.config import load_pipelines

pytestmark = pytest.mark.slow  # flows and the session store: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _export(model_uri: str, fmt: str, out: Path):
    from flows.cli.commands import app

    return runner.invoke(app, ["export", model_uri, "--format", fmt, "--out", str(out)])


def test_lmp_export_hf_loads_in_transformers_and_generates_what_lmp_generate_does(store, tmp_path):
    import transformers

    from flows.cli.commands import app

    done = _export("models:/smoke@champion", "hf", tmp_path / "hf")
    assert done.exit_code == 0, done.output
    assert "GPT2LMHeadModel" in done.output and 'AutoModelForCausalLM.from_pretrained("' in done.output
    provenance = json.loads((tmp_path / "hf" / "lm_pipelines.json").read_text())["source"]
    assert provenance["model_uri"].startswith("models:/smoke/") and len(provenance["weights_digest"]) == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "ROMEO:\n"
    new = model.config.n_positions - len(tok(prompt)["input_ids"])  # GPT-2 cannot look past its positions
    greedy = model.generate(**tok(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=new, min_new_tokens=new)
    ours = runner.invoke(app, ["generate", "models:/smoke@champion", prompt, "--temperature", "0",
                               "--max-new-tokens", str(new)])  # fmt: skip
    assert ours.exit_code == 0 and ours.output == tok.decode(greedy[0]) + "\n"


def test_export_refusals_are_one_line_with_exit_2(store, tmp_path, monkeypatch):
    lstm = _export("models:/smoke-lstm@champion", "hf", tmp_path / "a")
    assert lstm.exit_code == 2 and "no LSTM language model" in lstm.output and "--format onnx" in lstm.output
    assert not (tmp_path / "a").exists()
    unknown = _export("models:/nope@champion", "hf", tmp_path / "b")
    assert unknown.exit_code == 2 and "lmp export models:/nope@champion: there is no registered model" in unknown.output
    assert _export("runs:/abc/model", "hf", tmp_path / "c").exit_code == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    busy = _export("models:/smoke@champion", "hf", tmp_path / "full")
    assert busy.exit_code == 2 and "not an empty folder" in busy.output and (tmp_path / "full" / "keep.txt").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)  # the hf extra not installed
    missing = _export("models:/smoke@champion", "hf", tmp_path / "d")
    assert missing.exit_code == 2 and 'pip install -e ".[hf]"' in missing.output


def test_further_pretraining_from_an_exported_folder_starts_from_its_weights_and_exports_the_new_version(
    store, tmp_path
):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from flows.pipeline import lm_pipeline
    from flows.registry.register import download_package

    assert _export("models:/smoke@champion", "hf", tmp_path / "hf").exit_code == 0
    smoke = load_pipelines(ROOT / "pipelines.yaml").get("smoke")
    spec = smoke.overridden({"name": "smoke-from-hf", "init_from": f"hf:{tmp_path / 'hf'}", "model": None,
                             "tokenizer": None, "train.max_steps": 1, "export": ["hf"]})  # fmt: skip
    result = lm_pipeline(spec, workdir=str(store / ".lmp"))
    client = MlflowClient()
    champion = client.get_model_version_by_alias("smoke", "champion")
    original = load_file(download_package("smoke", champion.version, tmp_path / "smoke").weights)
    imported = load_file(result["init"]["package"]["weights"])
    assert imported.keys() == original.keys() and all(torch.equal(imported[k], original[k]) for k in original)
    version = client.get_model_version("smoke-from-hf", result["registered"]["version"])
    assert version.tags["lmp.init_from"] == f"hf:{tmp_path / 'hf'}"
    assert version.tags["tokenizer_digest"] == champion.tags["tokenizer_digest"]  # its own tokenizer, not a new one
    assert version.tags["lmp.export.hf"] == f"runs:/{version.run_id}/export/hf"
    exported = {a.path for a in client.list_artifacts(version.run_id, "export/hf")}
    assert {"export/hf/config.json", "export/hf/model.safetensors", "export/hf/tokenizer.json"} <= exported
    run = client.get_run(version.run_id)
    assert run.data.params["init_from"] == f"hf:{tmp_path / 'hf'}" and run.data.params["model.kind"] == "gpt"
    # a second further-pretraining run meets the first at the gate: the generation card compares them
    again = lm_pipeline(spec.overridden({"train.seed": 1, "export": []}), workdir=str(store / ".lmp"))
    assert int(again["registered"]["version"]) == int(version.version) + 1
    cards = {a.path for a in client.list_artifacts(again["run_id"], "gate")}
    assert "gate/generation_card.md" in cards


def test_lmp_export_onnx_of_the_lstm_runs_in_onnx_runtime_carrying_its_state(store, tmp_path):
    import numpy as np
    import onnxruntime
    import tokenizers

    from flows.registry.register import download_package
    from lm import package as packaging

    done = _export("models:/smoke-lstm@champion", "onnx", tmp_path / "onnx")
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["carried"] == {"hn": "h0", "cn": "c0"} and meta["source"]["model_uri"].startswith("models:/smoke-lstm/")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    text = "ROMEO:\nWhat light through yonder window breaks?"
    ids = np.array([tok.encode(text).ids], dtype=np.int64)
    state = np.zeros(meta["inputs"]["h0"]["shape"][:1] + [1] + meta["inputs"]["h0"]["shape"][2:], dtype=np.float32)
    first = session.run(None, {"input_ids": ids[:, :10], "h0": state, "c0": state})
    second = session.run(None, {"input_ids": ids[:, 10:], "h0": first[1], "c0": first[2]})
    version = json.loads((tmp_path / "onnx" / "onnx.json").read_text())["source"]["model_uri"].rsplit("/", 1)[1]
    ours = packaging.load(download_package("smoke-lstm", version, tmp_path / "package"))
    with torch.no_grad():
        expected = ours.model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.concatenate([first[0], second[0]], axis=1) - expected).max() <= 1e-4
