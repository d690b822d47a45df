"""Faults while a run's model is logged and registered: the run's state and the registry stay consistent."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import LoggedModelStatus, RunStatus
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient
from safetensors.torch import save_model

from flows import tracking
from flows.config import PromoteConfig
from flows.registry import promotion
from flows.registry import register as registry
from lm.config import GPTConfig
from lm.models import build_model
from lm.results import Package, Served
from lm.tokenizers import CharTokenizer

GATE = PromoteConfig(metric="val_bpc", mode="min", min_improvement=0.005)


def _package(where: Path, seed: int = 0) -> dict[str, str]:
    """A tiny causal model's package files (weights, config, tokenizer)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(num_layers=1, num_heads=1, embed_dim=8, context_length=8)
    tok = CharTokenizer(sorted(set("ROMEO:\n abcdefgh")))
    where.mkdir()
    save_model(build_model(cfg, tok.vocab_size), str(where / "model.safetensors"))
    (where / "config.json").write_text(json.dumps({"model": cfg.model_dump(mode="json"), "vocab_size": tok.vocab_size}))
    (where / "tokenizer.json").write_text(tok.to_json())
    return {"weights": str(where / "model.safetensors"), "config": str(where / "config.json"),
            "tokenizer": str(where / "tokenizer.json")}  # fmt: skip


def _running_run(client: MlflowClient) -> str:
    """A RUNNING run, as the pipeline's tracked_run holds it while registering (artifacts under the store's
    ``mlruns/artifacts``, as the pipeline's experiments have them)."""
    return client.create_run(_experiment(client)).info.run_id


def _experiment(client: MlflowClient) -> str:
    return tracking.experiment_id(client, "lm", mlflow.get_tracking_uri())


def _register(client, run_id, files, bpc=2.5):
    tags = {"val_bpc": str(bpc), "data_digest": "d"}
    served = Served(example_input="ROMEO:\n", example_output=["ROMEO:\n..."])
    return registry.log_and_register(run_id, "lm", Package(**files), tags, served, promote=GATE)


def test_the_run_stays_running_until_the_version_is_registered_and_the_aliases_moved(
    mlflow_store, tmp_path, monkeypatch
):
    client = MlflowClient()
    run_id = _running_run(client)
    real_move, seen = promotion.move_aliases, []

    def move_aliases(client, name, moves, **kwargs):
        seen.append(client.get_run(run_id).info.status)
        return real_move(client, name, moves, **kwargs)

    monkeypatch.setattr(promotion, "move_aliases", move_aliases)
    registered = _register(client, run_id, _package(tmp_path / "pkg"))
    assert seen and set(seen) == {RunStatus.to_string(RunStatus.RUNNING)}
    assert client.get_run(run_id).info.status == "RUNNING"  # tracked_run ends it, not the registry
    assert client.get_run(run_id).data.tags["lmp.registered_version"] == str(registered.version)
    (logged,) = client.search_logged_models(experiment_ids=[_experiment(client)])
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY


def _model_dirs(store: Path) -> list[Path]:
    return sorted((store / "mlruns" / "artifacts" / "models").glob("m-*"))


def test_a_full_disk_while_logging_the_model_registers_nothing_and_leaves_no_partial_artifacts(
    mlflow_store, tmp_path, monkeypatch
):
    client = MlflowClient()
    files, run_id = _package(tmp_path / "pkg"), _running_run(client)
    real_log_artifacts = LocalArtifactRepository.log_artifacts

    def disk_full(self, local_dir, artifact_path=None):  # the first file lands, then the disk is full
        first = next(p for p in sorted(Path(local_dir).rglob("*")) if p.is_file())
        Path(self.artifact_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(first, Path(self.artifact_dir) / first.name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", disk_full)
    with pytest.raises(OSError, match=r"No space left on device.*nothing was registered") as raised:
        _register(client, run_id, files)
    assert raised.value.errno == errno.ENOSPC
    assert client.search_registered_models() == []  # not even an empty registered model
    assert _model_dirs(tmp_path) == []  # no half-written model directory
    (failed,) = client.search_logged_models(experiment_ids=[_experiment(client)])
    assert failed.status == LoggedModelStatus.FAILED
    assert "lmp.registered_version" not in client.get_run(run_id).data.tags

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", real_log_artifacts)
    again = _register(client, run_id, files)  # space freed: the rerun registers the one version
    assert again.created and again.version == 1
    assert len(_model_dirs(tmp_path)) == 1

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", disk_full)
    with pytest.raises(OSError, match="nothing was registered"):  # a second version fails the same way
        _register(client, _running_run(client), _package(tmp_path / "pkg2", seed=1), bpc=2.4)
    assert [int(v.version) for v in client.search_model_versions("name = 'lm'")] == [1]
    assert len(_model_dirs(tmp_path)) == 1
    assert {a: int(v) for a, v in client.get_registered_model("lm").aliases.items()} == {
        "challenger": 1,
        "champion": 1,
    }
