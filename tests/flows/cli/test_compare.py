"""`lmp compare` on a small store of hand-logged runs: one unit per column, data digest and status, --sort in
the unit table's direction, --where without eval; unknown registered models named with the ones that exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lm.metrics import METRICS, RENAMED

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()
DIGEST_A, DIGEST_B = "a1" * 32, "b2" * 32


def _log(client, pipeline: str, metrics: dict, *, status="FINISHED", digest=DIGEST_A, kind="gpt", tags=None) -> str:
    experiment = client.get_experiment_by_name(pipeline)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(pipeline)
    run = client.create_run(experiment_id, tags={"pipeline": pipeline, "data_digest": digest, **(tags or {})})
    client.log_param(run.info.run_id, "model.kind", kind)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def compare_store(tmp_path_factory):
    """One embedded store for the whole module (the tests only read it): two language models on two data
    digests (one run failed), an encoder, a classifier with today's metric names and one logged before the
    rename (`val_loss` in nats per example); two registered models, alpha and beta (a text artifact each)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from flows.registry import promotion

    path = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("TMPDIR", str(path))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking.configure(path)
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # a store outside a project, named on purpose
        client = MlflowClient()
        clf = {
            "val_loss_per_example": 0.9,
            "val_label_accuracy": 0.6,
            "val_macro_f1": 0.5,
            "val_baseline_macro_f1": 0.2,
        }
        old = {"val_loss": 1.1, "val_accuracy": 0.55, "val_macro_f1": 0.45, "val_baseline_accuracy": 0.3}
        runs = {
            "lm-good": _log(client, "lm", {"val_bpc": 2.4, "val_loss": 1.6, "val_accuracy": 0.40}),
            "lm-bad": _log(client, "lm", {"val_bpc": 2.9, "val_loss": 1.9, "val_accuracy": 0.30}, digest=DIGEST_B),
            "lm-failed": _log(client, "lm", {}, status="FAILED"),
            "enc": _log(client, "enc", {"val_mlm_loss": 3.1, "val_mlm_perplexity": 22.0}, kind="encoder"),
            "clf": _log(client, "clf", clf, tags={"lmp.init_from": "models:/lm/1"}),
            "clf-old": _log(client, "clf", old, tags={"lmp.init_from": "models:/lm/1"}),
        }
        for name in ("alpha", "beta"):
            with mlflow.start_run(experiment_id=client.create_experiment(f"{name}-models")) as run:
                mlflow.log_text("weights", "model.txt")
            model = f"runs:/{run.info.run_id}/model.txt"
            promotion.register_version(client, name, run.info.run_id, {"val_bpc": "2.5"}, "w", lambda m=model: m)
        try:
            yield {"runs": runs, "uri": uri, "path": path}
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture
def runs(compare_store, monkeypatch):
    monkeypatch.chdir(compare_store["path"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", compare_store["uri"])
    return compare_store["runs"]


@pytest.fixture
def models(compare_store, monkeypatch):
    monkeypatch.chdir(compare_store["path"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", compare_store["uri"])
    return compare_store["uri"]


def _json(*args: str) -> list[dict]:
    from flows.cli.commands import app

    result = runner.invoke(app, ["compare", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_each_column_is_one_metric_name_with_one_unit(runs):
    rows = {r["run"]: r for r in _json()}
    by = {name: rows[run_id] for name, run_id in runs.items()}
    assert by["clf"].get("val_loss") is None and by["clf"]["val_loss_per_example"] == pytest.approx(0.9)
    # a classifier logged before the rename: its nats per example never land in the nats-per-token column
    assert by["clf-old"].get("val_loss") is None and by["clf-old"]["val_loss_per_example"] == pytest.approx(1.1)
    assert by["clf-old"].get("val_accuracy") is None and by["clf-old"]["val_label_accuracy"] == pytest.approx(0.55)
    assert by["lm-good"]["val_loss"] == pytest.approx(1.6) and by["lm-good"]["val_accuracy"] == pytest.approx(0.4)
    assert by["lm-good"].get("val_label_accuracy") is None
    assert [by[n]["task"] for n in ("lm-good", "enc", "clf", "clf-old")] == [
        "language-model",
        "encoder",
        "classifier",
        "classifier",
    ]
    columns = set().union(*(r.keys() for r in rows.values()))
    metric_columns = {c for c in columns if c.startswith(("val_", "test_"))}
    assert metric_columns and metric_columns <= set(METRICS), metric_columns - set(METRICS)
    assert not metric_columns & set(RENAMED) - {"val_loss", "val_accuracy", "test_loss", "test_accuracy"}


def test_data_digest_and_status_are_columns_and_different_data_is_called_out(runs):
    rows = {r["run"]: r for r in _json("lm")}
    assert rows[runs["lm-good"]]["data"] == DIGEST_A[:12] and rows[runs["lm-bad"]]["data"] == DIGEST_B[:12]
    assert rows[runs["lm-failed"]]["status"] == "FAILED"
    from flows.cli.commands import app

    table = runner.invoke(app, ["compare", "lm"])
    assert table.exit_code == 0, table.output
    assert DIGEST_A[:12] in table.output and DIGEST_B[:12] in table.output and "FAILED" in table.output
    assert "2 data digests" in table.output  # the footnote: these runs did not see the same data
    assert "val_bpc: bits/char, lower is better (language-model)" in table.output  # each column's unit and task


def test_sort_follows_the_unit_table_and_refuses_metrics_the_runs_do_not_share(runs):
    from flows.cli.commands import app

    ordered = [r["run"] for r in _json("lm", "--sort", "val_bpc")]
    assert ordered == [runs[n] for n in ("lm-good", "lm-bad", "lm-failed")]  # lower is better; no value last
    f1 = [r["run"] for r in _json("--where", "task=classifier", "--sort", "val_macro_f1")]
    assert f1 == [runs["clf"], runs["clf-old"]]  # higher is better
    mixed = runner.invoke(app, ["compare", "--sort", "val_bpc"])
    assert mixed.exit_code == 2 and "val_bpc" in mixed.output and "classifier" in mixed.output, mixed.output
    assert "Traceback" not in mixed.output
    unknown = runner.invoke(app, ["compare", "--sort", "val_nonsense"])
    assert unknown.exit_code == 2 and "val_bpc" in unknown.output  # names the metrics there are


def test_where_filters_with_a_small_parser_and_refuses_anything_else(runs):
    from flows.cli.commands import app

    assert {r["run"] for r in _json("--where", "pipeline=lm", "--where", "status=FINISHED")} == {
        runs["lm-good"],
        runs["lm-bad"],
    }
    assert [r["run"] for r in _json("--where", "val_bpc<2.5")] == [runs["lm-good"]]
    assert [r["run"] for r in _json("--where", f"data={DIGEST_B[:6]}")] == [runs["lm-bad"]]  # digest prefix
    assert {r["run"] for r in _json("--where", "pipeline!=lm", "--where", "val_macro_f1>=0.5")} == {runs["clf"]}
    for bad, says in (
        ("__import__('os').system('true')", "--where"),
        ("val_bpc<low", "a number"),
        ("colour=red", "pipeline"),  # unknown column: the message lists the ones there are
        ("pipeline", "KEY OP VALUE"),
    ):
        result = runner.invoke(app, ["compare", "--where", bad])
        assert result.exit_code == 2 and says in result.output, (bad, result.output)
        assert "Traceback" not in result.output


def test_csv_keeps_the_columns(runs):
    from flows.cli.commands import app

    result = runner.invoke(app, ["compare", "lm", "--format", "csv"])
    assert result.exit_code == 0
    header = result.output.splitlines()[0].split(",")
    assert {"pipeline", "run", "status", "data", "val_bpc"} <= set(header)


@pytest.mark.parametrize(
    "args",
    [
        ["promote", "no-such-model"],
        ["promote", "no-such-model", "--version", "1"],
        ["rollback", "no-such-model"],
        ["models", "no-such-model"],
        ["generate", "models:/no-such-model@champion", "x"],
        ["generate", "models:/no-such-model/1", "x"],
    ],
)
def test_an_unknown_model_is_named_with_the_models_there_are(models, args):
    from flows.cli.commands import app

    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no registered model 'no-such-model'; the models are: alpha, beta" in result.output, result.output
    assert "@challenger" not in result.output and "version 1" not in result.output


def test_promote_an_unknown_model_exits_2_in_a_real_process(models, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": models, "TMPDIR": str(tmp_path)}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli.commands", "promote", "no-such-model"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "the models are: alpha, beta" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


def test_every_evaluation_name_is_in_the_one_table_under_its_own_task():
    """What the classifier and the language model evaluations return: each name in lm.metrics with its task,
    none shared between the two (per-class scores aside)."""
    import numpy as np

    from lm.classification.metrics import confusion_matrix, majority_baseline, scores
    from lm.evaluation import lm_metrics

    truth, predicted, labels = np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"]
    for split in ("val", "test"):
        classifier = scores(confusion_matrix(truth, predicted, 2), labels, split)
        classifier |= majority_baseline(truth, truth, labels, split) | {f"{split}_loss_per_example": 0.5}
        language = lm_metrics(1.0, 10, 20, prefix=split) | {f"{split}_accuracy": 0.5}
        per_class = {k for k in classifier if k.split("_")[-1] in labels}
        assert all(METRICS[k].tasks == ("classification",) for k in set(classifier) - per_class)
        assert all(METRICS[k].tasks == ("causal",) for k in language)
        assert not set(classifier) & set(language)
