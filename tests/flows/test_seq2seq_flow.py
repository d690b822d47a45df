"""Seq2seq pipelines through the real flow: a decoder and an encoder–decoder fine-tuned from registered models,
their lineage, metrics, artifacts and gate, bad inputs refused before anything is registered, and a real
`mlflow models serve` answering a translation request."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.config import load_pipelines
from lm.errors import DataError
from tests.flows.helpers import build_store, use_store

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
ENCODER = {"kind": "encoder", "num_layers": 2, "num_heads": 2, "embed_dim": 32, "context_length": 32}
runner = CliRunner()


def _shipped():
    return load_pipelines(ROOT / "pipelines.yaml")


def _encdec():
    return (
        _shipped()
        .get("smoke-names")
        .overridden(
            {
                "name": "smoke-names-encdec",
                "architecture": "encoder-decoder",
                "encoder_from": "models:/smoke-encoder@champion",
            }
        )
    )


@pytest.fixture(scope="module")
def s2s_store(prefect_harness, tmp_path_factory):
    """Its own embedded store: the smoke GPT, a smoke encoder with the same char tokenizer, a BPE smoke encoder
    (another tokenizer), and the seq2seq models fine-tuned from them (smoke-names; its encoder–decoder twin)."""
    shipped = _shipped()
    smoke = shipped.get("smoke")
    encoder = smoke.overridden({"name": "smoke-encoder", "model": ENCODER, "promote": {"metric": "val_mlm_loss"}})
    bpe = encoder.overridden({"name": "smoke-encoder-bpe", "tokenizer": {"kind": "bpe", "vocab_size": 300}})
    path = build_store(tmp_path_factory.mktemp("s2s"), [smoke, encoder, bpe, shipped.get("smoke-names"), _encdec()])
    yield path


@pytest.fixture
def store(s2s_store, monkeypatch):
    yield use_store(s2s_store, monkeypatch)


def test_a_decoder_fine_tuned_from_a_registered_gpt_records_lineage_metrics_and_outputs(store):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    lm = client.get_model_version_by_alias("smoke", "champion")
    version = client.get_model_version_by_alias("smoke-names", "champion")
    assert version.tags["lmp.init_model"] == f"models:/smoke/{lm.version}"
    assert version.tags["tokenizer_digest"] == lm.tags["tokenizer_digest"]  # the GPT's own tokenizer
    assert version.tags["lmp.gate.metric"] == "val_chrf" and version.tags["task"] == "seq2seq"
    run = client.get_run(version.run_id)
    for key in ("val_chrf", "val_bleu", "val_baseline_chrf", "val_target_loss", "test_chrf", "data_pairs_train"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["val_chrf"] <= 100.0
    assert run.data.params["application"] == "translation" and run.data.params["model.kind"] == "gpt"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/outputs_val.json", "evaluation/signatures.json"} <= artifacts
    signatures = Path(client.download_artifacts(version.run_id, "evaluation/signatures.json")).read_text()
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in signatures  # sacrebleu's own signature of BLEU
    served = mlflow.pyfunc.load_model("models:/smoke-names@champion")
    outputs = served.predict(["Monday", "Gothic"], params={"num_beams": 2, "max_new_tokens": 5})
    assert len(outputs) == 2 and all(isinstance(o, str) and len(o) <= 5 for o in outputs)


def test_an_encoder_decoder_starts_from_the_registered_encoder_and_gpt(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias("smoke-names-encdec", "champion")
    encoder = client.get_model_version_by_alias("smoke-encoder", "champion")
    assert version.tags["lmp.encoder_model"] == f"models:/smoke-encoder/{encoder.version}"
    assert version.tags["lmp.init_model"].startswith("models:/smoke/")
    run = client.get_run(version.run_id)
    assert run.data.params["encoder.kind"] == "encoder" and "val_chrf" in run.data.metrics
    assert "cross-attention in every decoder block" in version.description


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder_from": "models:/smoke-encoder-bpe@champion"}, r"have different tokenizers"),
        ({"init_from": "models:/smoke-encoder@champion", "encoder_from": "models:/smoke@champion"},
         r"init_from models:/smoke-encoder@champion has model.kind encoder, not gpt"),
        ({"init_from": "models:/smoke-names@champion", "encoder_from": "models:/smoke-encoder@champion"},
         r"is a seq2seq model; start from a registered language model"),
    ],
)  # fmt: skip
def test_init_models_that_do_not_fit_are_refused_before_anything_is_registered(store, change, message):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    before = len(MlflowClient().search_model_versions("name = 'smoke-names-encdec'"))
    with pytest.raises(DataError, match=message):
        lm_pipeline(_encdec().overridden(change), workdir=str(store / ".lmp"))
    assert len(MlflowClient().search_model_versions("name = 'smoke-names-encdec'")) == before


def test_lmp_run_with_a_missing_column_exits_2_naming_the_columns(store, tmp_path):
    from flows.cli.commands import app

    (store / "pairs.csv").write_text("english,french\nMonday,lundi\nTuesday,mardi\n")
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        "default: bad\npipelines:\n  bad:\n    task: seq2seq\n    init_from: models:/smoke@champion\n"
        "    data: {source: files, paths: [pairs.csv]}\n"
    )
    result = runner.invoke(app, ["run", "bad", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "source" in result.output and "english" in result.output and "Traceback" not in result.output


def test_a_served_translator_answers_over_http(store, tmp_path):
    from flows import tracking
    from tests.flows.registry.test_serving import serving

    with serving((tracking.default_tracking_uri(store), "models:/smoke-names@champion"), tmp_path) as server:
        status, body, _ = server.post({"inputs": ["Monday", "Linear B"], "params": {"max_new_tokens": 6}})
        assert status == 200, body
        assert len(body["predictions"]) == 2 and all(isinstance(p, str) for p in body["predictions"])
        status, body, _ = server.post({"inputs": ["Monday"], "params": {"num_beams": 2, "temperature": 0.5}})
        assert status == 400 and "beam search is deterministic" in body["message"]


def test_a_registered_translator_replays_identically_with_lmp_verify(store):
    """`lmp verify` on a seq2seq version: its pairs, its init model's tokenizer and every training step again,
    from the init model version the run resolved."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli.commands import app

    result = CliRunner().invoke(app, ["verify", "models:/smoke-names@champion"])
    assert result.exit_code == 0, result.output
    tags = MlflowClient().get_model_version_by_alias("smoke-names", "champion").tags
    assert [tags[f"lmp.verify.{k}"] for k in ("data", "tokenizer", "loss", "weights")] == ["identical"] * 4
