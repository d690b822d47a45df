"""Classification pipelines through the real flow: lineage, tokenizer, artifacts, gate, compare, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.config import load_pipelines
from lm.errors import DataError

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]

runner = CliRunner()


def _genre():
    return load_pipelines(ROOT / "pipelines.yaml").get("smoke-genre")


def test_a_classifier_records_its_lineage_tokenizer_and_evaluation(store):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    lm = client.get_model_version_by_alias("smoke", "champion")
    version = client.get_model_version_by_alias("smoke-genre", "champion")
    assert version.tags["lmp.init_model"] == f"models:/smoke/{lm.version}"
    assert version.tags["tokenizer_digest"] == lm.tags["tokenizer_digest"]  # the LM's own tokenizer
    assert version.tags["lmp.gate.metric"] == "val_macro_f1"
    run = client.get_run(version.run_id)
    for key in (
        "val_label_accuracy",
        "val_loss_per_example",
        "val_macro_f1",
        "val_baseline_macro_f1",
        "val_precision_histories",
        "val_recall_comedies",
    ):
        assert key in run.data.metrics, key
    assert run.data.params["model.kind"] == "gpt" and run.data.tags["lmp.init_run_id"] == lm.run_id
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {
        "evaluation/confusion_val.png",
        "evaluation/confusion_val.json",
        "evaluation/per_class_val.json",
    } <= artifacts
    confusion = json.loads(Path(client.download_artifacts(version.run_id, "evaluation/confusion_val.json")).read_text())
    assert confusion["labels"] == ["comedies", "histories", "tragedies"]
    assert sum(map(sum, confusion["rows_true_columns_predicted"])) == run.data.metrics["data_examples_val"]
    assert f"initialised from `models:/smoke/{lm.version}`" in version.description
    served = mlflow.pyfunc.load_model("models:/smoke-genre@champion")
    [out] = served.predict(["KING HENRY:\nOnce more unto the breach"])
    assert out["label"] in out["probabilities"] and sum(out["probabilities"].values()) == pytest.approx(1.0)


def test_an_init_model_that_does_not_exist_names_the_registered_ones(store):
    from flows.pipeline import lm_pipeline

    missing = _genre().overridden({"init_from": "models:/no-such-lm@champion"})
    with pytest.raises(DataError, match=r"no registered model 'no-such-lm'; the registered models are .*smoke, "):
        lm_pipeline(missing, workdir=str(store / ".lmp"))
    no_alias = _genre().overridden({"init_from": "models:/smoke@gold"})
    with pytest.raises(DataError, match=r"has no alias @gold; it has aliases @challenger, @champion"):
        lm_pipeline(no_alias, workdir=str(store / ".lmp"))


def test_compare_lines_up_the_classifier(store):
    from flows.cli.commands import app

    result = runner.invoke(app, ["compare", "smoke-genre", "--format", "json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)[-1:]
    assert row["init"].startswith("models:/smoke/") and row["architecture"] == "gpt"
    for column in ("val_label_accuracy", "val_macro_f1", "val_baseline_macro_f1"):
        assert 0.0 <= row[column] <= 1.0, column
    assert row["task"] == "classifier" and row.get("val_loss") is None and row.get("val_accuracy") is None
    plan = runner.invoke(app, ["plan", "smoke-genre", "--config", str(ROOT / "pipelines.yaml")])
    assert plan.exit_code == 0 and "init-model" in plan.output and "cached" in plan.output


def test_a_scratch_classifier_trains_its_own_tokenizer_and_gates_on_macro_f1(store):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline

    model = {"kind": "gpt", "num_layers": 1, "num_heads": 2, "embed_dim": 16, "context_length": 32}
    scratch = _genre().overridden({"name": "smoke-genre-scratch", "init_from": "scratch", "model": model})
    result = lm_pipeline(scratch, workdir=str(store / ".lmp"))
    assert result["init"] is None and result["stages"]["ingest"] is True  # same examples as smoke-genre: reused
    version = MlflowClient().get_model_version("smoke-genre-scratch", str(result["registered"]["version"]))
    assert version.tags["lmp.init_from"] == "scratch" and version.tags["lmp.gate.promoted"] == "True"
