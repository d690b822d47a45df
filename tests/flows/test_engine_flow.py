"""Training-engine behaviour seen through the flow: a Prefect retry resumes, NaN fails with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.config import load_pipelines

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]


def _spec(**train):
    spec = load_pipelines(ROOT / "pipelines.yaml").get("smoke")
    base = {"max_steps": 30, "checkpoint_interval": 10, "log_interval": 5, "eval_interval": 30}
    return spec.overridden(
        {"retries": 1, "retry_delay_seconds": 0.0} | {f"train.{key}": value for key, value in (base | train).items()}
    )


def _history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_prefect_retry_of_train_resumes_from_the_newest_checkpoint(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from flows.pipeline import lm_pipeline

    spec = _spec()
    golden = lm_pipeline(spec, workdir=str(tmp_path / "golden"))  # uninterrupted

    real_call, failed = tracking.MetricSink.__call__, []

    def flaky(self, step, metrics):  # one transient failure after the step-10 checkpoint
        if step == 15 and not failed:
            failed.append(step)
            raise OSError("disk hiccup")
        return real_call(self, step, metrics)

    monkeypatch.setattr(tracking.MetricSink, "__call__", flaky)
    result = lm_pipeline(spec, workdir=str(tmp_path / "retried"))
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert failed == [15] and run.info.status == "FINISHED"
    assert run.data.tags["lmp.resumed_from_step"] == "10"
    assert _history(client, run.info.run_id, "train_loss") == list(range(5, 31, 5))  # no gap, no duplicate
    assert result["metrics"]["val_loss"] == golden["metrics"]["val_loss"]  # bit-identical training on CPU


def test_nan_injection_fails_the_run_with_the_reason_and_keeps_the_last_good_checkpoint(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lm_pipeline
    from lm.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
    from lm.models import GPT, build_model
    from lm.training import TrainingError

    real_score, training_calls = GPT.score, []

    def poisoned(self, window, state=None, generator=None):
        nll, count, state = real_score(self, window, state, generator)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            training_calls.append(1)
            if len(training_calls) > 15:
                nll = nll * float("nan")
        return nll, count, state

    monkeypatch.setattr(GPT, "score", poisoned)
    spec = _spec(max_nonfinite_steps=3)
    with pytest.raises(TrainingError, match="non-finite"):
        lm_pipeline(spec, workdir=str(tmp_path / ".lmp"))
    assert len(training_calls) == 15 + 3  # stopped at the bound and not retried

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite loss or gradient norm on 3 steps" in run.data.tags["lmp.failure"]
    assert _history(client, run.info.run_id, "train_loss") == [5, 10, 15]
    latest, rejected = latest_checkpoint(tmp_path / ".lmp" / "runs" / run.info.run_id)
    assert latest.name == "step-00000010" and rejected == []
    model = build_model(spec.model, vocab_size=verify_checkpoint(latest)["vocab_size"])
    assert load_checkpoint(latest, model)["step"] == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input_is_not_retried(prefect_harness, mlflow_store, tmp_path, monkeypatch):
    from flows.pipeline import lm_pipeline
    from lm import stages
    from lm.errors import DataError

    calls = []
    real_ingest = stages.ingest

    def counting(*args, **kwargs):
        calls.append(1)
        return real_ingest(*args, **kwargs)

    monkeypatch.setattr(stages, "ingest", counting)
    spec = _spec()
    tiny = spec.overridden({"data.max_chars": 30, "retries": 2})
    with pytest.raises(DataError, match="split too short"):
        lm_pipeline(tiny, workdir=str(tmp_path / ".lmp"))
    assert calls == [1]  # retries: 2, but bad input fails at once
