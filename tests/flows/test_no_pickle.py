"""Nothing is pickled: a failing pipeline leaves no pickle in Prefect's result storage.

Prefect writes the exception of a failed flow run to its result storage whatever ``persist_result``
says; with its default serializer that is a base64 pickle under ``~/.prefect/storage``."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import pytest

from flows.config import load_pipelines

ROOT = Path(__file__).resolve().parents[2]
PICKLE = b"\x80"  # every pickle of protocol 2 and later starts with the PROTO opcode


def _pickled(blob: bytes) -> bool:
    """Whether ``blob`` is a pickle, raw or base64-encoded (as Prefect's pickle serializer writes it)."""
    if blob.startswith(PICKLE):
        return True
    try:
        return base64.b64decode(blob, validate=False).startswith(PICKLE)
    except (binascii.Error, ValueError):
        return False


def test_the_pickle_check_recognises_what_prefect_wrote_before():
    import pickle

    raw = pickle.dumps(ValueError("x"))
    assert _pickled(raw) and _pickled(base64.b64encode(raw)) and not _pickled(b'{"message": "x"}')


def test_a_failing_run_leaves_no_pickle_in_the_result_storage(prefect_harness, mlflow_store, tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.config import validate_spec
    from flows.pipeline import lm_pipeline
    from lm.errors import DataError

    smoke = load_pipelines(ROOT / "pipelines.yaml").get("smoke").model_dump(mode="json", exclude_none=True)
    spec = validate_spec(smoke | {"data": {"source": "files", "paths": ["missing.txt"]}})
    storage = tmp_path / "prefect-storage"
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        with pytest.raises(DataError, match="missing.txt"):
            lm_pipeline(spec, workdir=str(tmp_path / ".lmp"), base_dir=str(tmp_path))
    written = [p for p in storage.rglob("*") if p.is_file()] if storage.exists() else []
    assert not [p for p in written if _pickled(p.read_bytes())], [p.read_bytes()[:80] for p in written]
    for record in written:  # what Prefect keeps of the failure is a readable JSON record
        assert "missing.txt" in json.loads(record.read_bytes())["message"]


def test_every_flow_and_task_keeps_no_pickled_result():
    """Each flow and task of the project: results not persisted, and the record of a failure (written
    regardless) serialized as JSON — `lmp run`, `lmp schedule`'s deployments and sweep trials alike."""
    import importlib
    import pkgutil

    from prefect import Flow, Task

    import flows

    found = {}
    for module in pkgutil.iter_modules(flows.__path__):
        namespace = vars(importlib.import_module(f"flows.{module.name}"))
        found |= {f"flows.{module.name}.{k}": v for k, v in namespace.items() if isinstance(v, (Flow, Task))}
    assert "flows.pipeline.lm_pipeline" in found and "flows.tasks.train" in found
    pickling = sorted(name for name, f in found.items() if f.result_serializer != "json" or f.persist_result)
    assert not pickling, f"{pickling}: pass **flows.tasks.RESULTS to their decorators"
