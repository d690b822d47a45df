"""The smoke pipeline end to end: a FINISHED MLflow run, its history, and a registered, pickle-free model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import load_pipelines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_spec():
    return load_pipelines(ROOT / "pipelines.yaml").get("smoke")


def test_smoke_flow_trains_evaluates_and_registers(prefect_harness, mlflow_store, smoke_spec, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    result = lm_pipeline(smoke_spec, workdir=str(tmp_path / ".lmp"))
    client = MlflowClient()
    run = client.get_run(result["run_id"])

    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_layers"] == "2"
    assert run.data.params["train.max_steps"] == str(smoke_spec.train.max_steps)
    assert int(run.data.params["num_parameters"]) > 0
    history = client.get_metric_history(run.info.run_id, "train_loss")
    steps = [m.step for m in history]
    assert steps == list(range(5, smoke_spec.train.max_steps + 1, 5))
    assert history[-1].value < history[0].value  # it learned something
    for key in ("val_loss", "val_bpc", "val_perplexity"):
        assert key in run.data.metrics
    assert run.data.tags["data_digest"] == result["data_digest"]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert 0 < run.data.metrics["mfu"] < 1 and float(run.data.tags["lmp.peak_gflops"]) > 0
    for split in ("val", "test"):  # smoke has a test split: both are evaluated the same way
        assert 0 <= run.data.metrics[f"{split}_accuracy"] <= 1 and run.data.metrics[f"{split}_bpc"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "loss_curve.png", "samples.json"} <= artifacts
    samples = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="samples.json", dst_path=str(tmp_path / "s")
            )
        ).read_text()
    )
    prompts = [row[0] for row in samples["data"]]
    assert prompts == ["ROMEO:\n", "JULIET:\n", "HAMLET:\nTo be, or not to be", "KING RICHARD III:\nNow is the winter"]
    assert all(row[1].startswith(row[0]) for row in samples["data"])
    assert any(key.startswith("system/cpu") for key in run.data.metrics)  # MLflow system metrics

    reg = result["registered"]
    assert reg["name"] == "smoke" and reg["uri"] == f"models:/smoke/{reg['version']}"
    version = client.get_model_version("smoke", str(reg["version"]))
    assert version.run_id == run.info.run_id
    assert version.description.startswith("# smoke — version") and "val_bpc" in version.description
    assert sorted(version.aliases) == ["challenger", "champion"]  # the first version: no champion to beat
    assert version.tags["lmp.gate.promoted"] == "True" and version.tags["lmp.gate.reason"] == "no champion yet"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect_client:
        keys = {a.key for a in prefect_client.read_artifacts()}
    assert {"smoke-model-card", "smoke-samples", "smoke-promotion"} <= keys
    assert version.tags["data_digest"] == result["data_digest"]
    assert version.tags["config_digest"] == smoke_spec.digest()
    assert float(version.tags["val_bpc"]) == pytest.approx(run.data.metrics["val_bpc"], rel=1e-5)

    # The registered model is pickle-free: it loads with pickle deserialization disabled,
    # and generates text from a prompt.
    artifacts = Path(mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "dl")))
    files = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(reg["uri"])
    out = model.predict(["ROMEO:\n", "JULIET:\n"], params={"max_new_tokens": 12, "seed": 1})
    assert len(out) == 2 and out[0].startswith("ROMEO:\n") and len(out[0]) == len("ROMEO:\n") + 12


def test_bad_data_fails_before_training_and_registers_nothing(prefect_harness, mlflow_store, smoke_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline
    from lm.data import DataError

    tiny = smoke_spec.overridden({"data.max_chars": 30})
    with pytest.raises(DataError, match=r"split too short \(train: 25 characters, val: 3 characters, test: 2 charac"):
        lm_pipeline(tiny, workdir=str(tmp_path / ".lmp"))
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


@pytest.mark.parametrize(
    "model",
    [
        {"kind": "lstm", "num_layers": 1, "embed_dim": 16, "hidden_dim": 32, "context_length": 32},
        {"kind": "encoder", "num_layers": 1, "num_heads": 2, "embed_dim": 16, "context_length": 32},
    ],
)
def test_every_architecture_runs_the_whole_flow_and_serves(
    model, prefect_harness, mlflow_store, smoke_spec, tmp_path, monkeypatch
):
    import mlflow

    from flows.pipeline import lm_pipeline

    gate = {"promote.metric": "val_mlm_loss"} if model["kind"] == "encoder" else {}  # what YAML would default to
    spec = smoke_spec.overridden({"model": model} | gate)
    result = lm_pipeline(spec, workdir=str(tmp_path / ".lmp"), base_dir=str(tmp_path))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    served = mlflow.pyfunc.load_model(result["registered"]["uri"])
    [out] = served.predict(["ROMEO:\n"], params={"max_new_tokens": 6})
    if model["kind"] == "encoder":
        assert "val_mlm_loss" in result["metrics"] and "val_bpc" not in result["metrics"]
        assert len(out) == 16 and all(isinstance(x, float) for x in out)  # mean-pooled features
        assert "filled in:" in result["sample"]
    else:
        assert result["metrics"]["val_bpc"] > 0
        assert out.startswith("ROMEO:\n") and len(out) == len("ROMEO:\n") + 6
