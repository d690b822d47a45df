"""`lmp sweep` on a local Dask cluster: four trials two at a time, one parent run, the best registered,
ingest and tokenize run once for all trials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, parse_pipelines

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))
GRID = {"train.learning_rate": [0.001, 0.003], "model.embed_dim": [16, 32]}


def _project(path: Path) -> Path:
    shipped = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    smoke = shipped["pipelines"]["smoke"] | {"sweep": {"method": "grid", "parameters": GRID, "max_parallel": 2}}
    (path / "pipelines.yaml").write_text(yaml.safe_dump({"default": "tiny", "pipelines": {"tiny": smoke}}))
    return path


def test_a_four_trial_sweep_on_a_local_dask_cluster(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    project = _project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env |= {"TMPDIR": str(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server: inspectable
    done = subprocess.run([LMP, "sweep", "tiny"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ranking by val_bpc" in done.stdout and "registered models:/tiny/1" in done.stdout

    from flows import tracking

    tracking.configure_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")  # tracking and registry
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("lmp.sweep.parent") == "true"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(trials) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {(float(t.data.params["train.learning_rate"]), int(t.data.params["model.embed_dim"])) for t in trials} == {
        (lr, width) for lr in GRID["train.learning_rate"] for width in GRID["model.embed_dim"]
    }
    best = min(trials, key=lambda t: t.data.metrics["val_bpc"])
    assert parent.data.tags["lmp.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_bpc"] == best.data.metrics["val_bpc"]
    [version] = client.search_model_versions("name = 'tiny'")  # only the best trial is registered
    assert version.run_id == best.info.run_id
    assert client.get_model_version_by_alias("tiny", "champion").version == version.version  # gated as usual

    with get_client(sync_client=True) as prefect:
        flows = {f.id: f.name for f in prefect.read_flows()}
        flow_runs = [r for r in prefect.read_flow_runs() if r.parameters.get("spec", {}).get("name") == "tiny"]
        sweep_runs = [r for r in flow_runs if flows[r.flow_id] == "lm-sweep"]
        trial_runs = [r for r in flow_runs if flows[r.flow_id] == "lm-trial"]
        assert len(sweep_runs) == 1 and len(trial_runs) == 4
        tasks = [t for t in prefect.read_task_runs() if t.flow_run_id in {r.id for r in sweep_runs + trial_runs}]
    names = sorted(t.name.split("-")[0] for t in tasks)
    assert names.count("ingest") == 1 and names.count("tokenize") == 1 and names.count("trial") == 4
    assert all(t.flow_run_id == sweep_runs[0].id for t in tasks if t.name.startswith(("ingest", "tokenize")))


def test_sweep_settings_are_checked_once():
    base = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]["smoke"]
    for sweep, problem in (
        ({"parameters": {"data.max_chars": [1000]}}, "only model.*, train.*, eval.*, head.* keys can vary"),
        ({"parameters": {"model.num_heads": [3]}}, "sweep.parameters make an invalid pipeline"),
        ({"method": "random", "parameters": {"train.seed": [1, 2]}}, "sweep.trials is required"),
    ):
        text = yaml.safe_dump({"default": "s", "pipelines": {"s": base | {"sweep": sweep}}})
        try:
            parse_pipelines(text)
        except ConfigError as e:
            assert problem in str(e), str(e)
        else:
            raise AssertionError(f"{sweep} was accepted")


def test_a_classifier_sweep_fine_tunes_every_trial_from_one_init_model(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows import tracking

    shipped = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]
    genre = shipped["smoke-genre"] | {"sweep": {"parameters": {"head.pooling": ["mean", "last"]}, "max_parallel": 2}}
    text = yaml.safe_dump({"default": "smoke", "pipelines": {"smoke": shipped["smoke"], "smoke-genre": genre}})
    (tmp_path / "pipelines.yaml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env |= {"TMPDIR": str(tmp_path)}
    for args in (["run", "smoke"], ["sweep", "smoke-genre"]):
        done = subprocess.run([LMP, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ranking by val_macro_f1 (max)" in done.stdout

    tracking.configure_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("smoke-genre").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("lmp.sweep.parent") == "true"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(t.data.params["head.pooling"] for t in trials) == ["last", "mean"]
    assert all(t.data.params["model.kind"] == "gpt" for t in trials)  # the init model's backbone
    best = max(t.data.metrics["val_macro_f1"] for t in trials)
    version = client.get_model_version_by_alias("smoke-genre", "champion")
    assert (
        version.run_id == parent.data.tags["lmp.sweep.best_run_id"]
        and version.tags["lmp.init_model"] == "models:/smoke/1"
    )
    assert client.get_run(version.run_id).data.metrics["val_macro_f1"] == best
