"""Registered versions in other formats: `lmp export` and a pipeline's ``export:`` option share this.

``lm.export`` does the conversion and checks it (Transformers / ONNX Runtime give our logits); here a registered
version is resolved and downloaded, and a pipeline's new version is exported and logged as artifacts of its run.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.config import INIT_URI
from flows.registry.register import download_package, resolve_init
from lm import package as packaging
from lm.checkpoint import sha256_file
from lm.errors import DataError
from lm.results import Package

FORMATS = ("hf", "onnx")


def export_package(package: Package, fmt: str, out: Path, provenance: dict) -> dict:
    """Write ``package`` in format ``fmt`` to the new folder ``out`` (checked on export); what was written."""
    loaded = packaging.load(package)
    if fmt == "hf":
        from lm.export.hf import export_hf

        done = export_hf(loaded, out, provenance=provenance)
        return {"path": done.path, "architecture": done.architecture, "max_logit_difference": done.max_logit_difference}
    if fmt == "onnx":
        from lm.export.onnx import export_onnx

        done = export_onnx(loaded, out, provenance=provenance)
        return {"path": str(out), "architecture": f"ONNX via {done['exporter']}",
                "max_logit_difference": done["max_abs_difference"].get("logits")} | done  # fmt: skip
    raise DataError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def export_version(model_uri: str, fmt: str, out: Path, scratch: Path) -> dict:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` downloaded under ``scratch`` and exported to ``out``."""
    if not INIT_URI.match(model_uri):
        raise DataError(f"{model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    version = resolve_init(model_uri, MlflowClient(), what="lmp export")
    package = download_package(version.name, version.version, Path(scratch) / f"{version.name}-v{version.version}")
    provenance = {"model_uri": f"models:/{version.name}/{version.version}", "requested": model_uri,
                  "run_id": version.run_id, "weights_digest": sha256_file(Path(package.weights))}  # fmt: skip
    return export_package(package, fmt, out, provenance) | {"model_uri": provenance["model_uri"]}


def export_registered(run_id: str, package: Package, formats: tuple[str, ...], name: str, version: str,
                      root: Path) -> dict[str, dict]:  # fmt: skip
    """A pipeline's ``export:``: each format of the newly registered version under ``root``, logged as the run's
    artifacts ``export/<format>``; the version is tagged ``lmp.export.<format>`` with their artifact URI."""
    client, done = MlflowClient(), {}
    provenance = {"model_uri": f"models:/{name}/{version}", "run_id": run_id,
                  "weights_digest": sha256_file(Path(package.weights))}  # fmt: skip
    for fmt in formats:
        out = Path(root) / fmt
        done[fmt] = export_package(package, fmt, out, provenance)
        client.log_artifacts(run_id, str(out), f"export/{fmt}")
        uri = f"runs:/{run_id}/export/{fmt}"
        client.set_model_version_tag(name, str(version), f"lmp.export.{fmt}", uri)
        done[fmt]["artifact_uri"] = uri
    return done
