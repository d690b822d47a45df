"""What the MLflow UI shows about a pipeline's experiment and runs: a model-training experiment described by the
pipeline's description; runs that say what they are, who started them, how, and from which commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "d" * 64


def _tags(run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).data.tags


def _experiment_tags(name: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_experiment_by_name(name).tags


def test_the_experiment_is_a_described_model_training_experiment(mlflow_store):
    from flows import tracking

    with tracking.tracked_run("pipe", "pipe-1", {"pipeline": "pipe"}, description="A tiny pipeline."):
        pass
    tags = _experiment_tags("pipe")
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "A tiny pipeline."

    with tracking.tracked_run("pipe", "pipe-2", {"pipeline": "pipe"}, description="A tiny pipeline, 2 layers."):
        pass
    assert _experiment_tags("pipe")["mlflow.note.content"] == "A tiny pipeline, 2 layers."  # follows the file

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("pipe").experiment_id
    client.set_experiment_tag(exp, "mlflow.note.content", "written in the UI")
    client.set_experiment_tag(exp, "mlflow.experimentKind", "finetuning")
    with tracking.tracked_run("pipe", "pipe-3", {"pipeline": "pipe"}, description="Yet another description."):
        pass
    tags = _experiment_tags("pipe")
    assert (tags["mlflow.note.content"], tags["mlflow.experimentKind"]) == ("written in the UI", "finetuning")


def test_a_run_says_what_it_is_who_started_it_and_from_which_commit(mlflow_store, monkeypatch):
    import getpass

    from flows import tracking

    monkeypatch.setattr("sys.argv", ["/somewhere/bin/lmp", "--verbose", "run", "pipe"])
    tags = {"pipeline": "pipe", "config_digest": "c" * 64}
    with tracking.tracked_run("pipe", "pipe-1", tags, description="A tiny pipeline.", base_dir=ROOT) as run_id:
        assert "digest not known yet" in _tags(run_id)["mlflow.note.content"]
        tracking.set_tags(run_id, {"data_digest": DIGEST})
    run = _tags(run_id)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else None  # None: a copy of the code without its history
    assert run.get("mlflow.source.git.commit") == commit
    assert run["mlflow.user"] == getpass.getuser()
    assert (run["mlflow.source.name"], run["mlflow.source.type"]) == ("lmp run", "LOCAL")
    note = run["mlflow.note.content"]
    assert note.startswith("Pipeline `pipe`: A tiny pipeline.")
    assert f"data: digest `{DIGEST[:16]}`" in note and "config: digest `cccc" in note
    assert "started by `lmp run`" in note and "a fresh run" in note
    assert (f"git `{commit[:12]}`" in note) if commit else ("git `" not in note)

    resumed = {"pipeline": "pipe", "lmp.resumed_from_step": "20"}
    with tracking.tracked_run("pipe", "pipe-1", resumed, run_id, description="A tiny pipeline."):
        pass
    note = _tags(run_id)["mlflow.note.content"]
    assert "resumed from the checkpoint at step 20" in note and "a fresh run" not in note
    assert f"data: digest `{DIGEST[:16]}`" in note  # still what it was


def test_a_failed_run_is_described_and_a_scheduled_run_is_a_job(mlflow_store, monkeypatch, tmp_path):
    from flows import tracking

    monkeypatch.setenv("LMP_SCHEDULE_CONFIG", str(tmp_path / "pipelines.yaml"))  # what `lmp schedule` sets
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path may lie inside a clone (CI)
    with pytest.raises(RuntimeError):
        with tracking.tracked_run("pipe", "pipe-1", {"pipeline": "pipe"}, base_dir=tmp_path) as run_id:
            raise RuntimeError("boom")
    run = _tags(run_id)
    assert (run["mlflow.source.name"], run["mlflow.source.type"]) == ("lmp schedule", "JOB")
    assert "mlflow.source.git.commit" not in run  # tmp_path is no git repository: no made-up commit
    assert run["mlflow.note.content"].startswith("Pipeline `pipe`.")


def test_the_ui_still_reads_the_experiment_kind_tag_and_value_written_here():
    """MLflow's UI bundle names the tag and the model-training kind as flows.tracking writes them (an MLflow
    upgrade that renames either fails here, not silently in the browser)."""
    import mlflow

    from flows import tracking

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    key, kind = tracking.EXPERIMENT_KIND
    texts = [p.read_text(errors="ignore") for p in bundle.glob("main.*.js")]
    assert any(f'"{key}"' in t and f'"{kind}"' in t for t in texts)
