"""The classification stages of ``lm_pipeline``: init model → ingest → tokenize → train → evaluate → register.

A classification pipeline starts from a registered language model (``init_from: models:/NAME@ALIAS``) —
its architecture, weights and tokenizer — or from scratch, and registers a classifier whose gate
compares macro-F1. The lineage (which LM version it was initialised from) is a tag on the run and on
the registered version, and a line of the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from flows import tasks, tracking
from flows.config import INIT_URI, ClassifierSpec
from flows.registry import classify_report
from flows.registry import register as registry
from lm.checkpoint import sha256_file
from lm.classification import stages
from lm.classification.data import describe
from lm.config import flatten
from lm.errors import DataError
from lm.plan import record_success

OPTS = tasks.OPTS


def _registered_names(client: MlflowClient) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def resolve_init(init_from: str, client: MlflowClient):
    """The registered version ``init_from`` names; a DataError names what exists when it does not."""
    match = INIT_URI.match(init_from)
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = _registered_names(client)
        raise DataError(
            f"init_from {init_from}: there is no registered model {name!r}; the registered models are "
            f"{', '.join(names) if names else '(none)'}. Run its language-model pipeline first (lmp run {name}) "
            "or fix the name"
        ) from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        aliases = sorted(f"@{a}" for a in (model.aliases or {}))
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise DataError(
            f"init_from {init_from}: model {name!r} has no {'alias @' + alias if alias else 'version ' + number}; "
            f"it has aliases {', '.join(aliases) or '(none)'} and versions {versions}"
        ) from None


@task(name="init-model", **OPTS)
def init_model(init_from: str, workdir: str) -> dict:
    """Resolve and download the initialising language model (reused when its weights are already here)."""
    client = MlflowClient()
    version = resolve_init(init_from, client)
    dest = Path(workdir) / "init" / f"{version.name}-v{version.version}"
    digest = version.tags.get("weights_digest")
    files = registry.package_files(dest) if dest.exists() else None
    if files is None or (digest and sha256_file(files["weights"]) != digest):
        files = registry.download_package(version.name, version.version, dest)
    config = json.loads(files["config"].read_text(encoding="utf-8"))
    if config.get("task", "language-model") != "language-model":
        raise DataError(f"init_from {init_from} is a {config['task']} model; initialise from a language model")
    get_run_logger().info("init: %s is version %s (run %s)", init_from, version.version, version.run_id)
    return {
        "requested": init_from,
        "uri": f"models:/{version.name}/{version.version}",
        "name": version.name,
        "version": int(version.version),
        "run_id": version.run_id,
        "weights_digest": digest or sha256_file(files["weights"]),
        "files": {k: str(v) for k, v in files.items()},
        "model": config["model"],
        "vocab_size": config["vocab_size"],
    }


@task(name="ingest", **OPTS)
def ingest(spec: ClassifierSpec, workdir: str, base_dir: str) -> dict:
    dataset = stages.prepare(spec.data, Path(workdir) / "labelled", base_dir=Path(base_dir))
    state = "cached" if dataset["cached"] else "built"
    get_run_logger().info("ingest: %s, digest %s… %s", state, dataset["digest"][:12], dataset["examples"])
    return dataset


@task(name="tokenize", **OPTS)
def tokenize(dataset: dict, spec: ClassifierSpec, init: dict | None, workdir: str) -> dict:
    tokenizer = Path(init["files"]["tokenizer"]) if init else spec.tokenizer
    encoded = stages.encode(dataset, tokenizer, Path(workdir) / "labelled-tokens", max_tokens=spec.data.max_tokens)
    model = init["model"] if init else spec.model.model_dump(mode="json")
    get_run_logger().info(
        "tokenize: %s (tokenizer from %s, %d ids)",
        "cached" if encoded["cached"] else "built",
        encoded["tokenizer_source"],
        encoded["vocab_size"],
    )
    return encoded | {"model": model, "init_weights": init["files"]["weights"] if init else None}


@task(name="evaluate", **OPTS)
def evaluate(encoded: dict, trained: dict, spec: ClassifierSpec, run_id: str) -> dict:
    result = stages.evaluate(encoded, trained["checkpoint"], backbone(encoded), spec.head, spec.train)
    tasks.log_new(run_id, result["metrics"], trained["steps"])  # a rerun after a later failure: no duplicates
    classify_report.log_evaluation(run_id, result)
    return result


backbone = stages.backbone_config


def lineage_tags(init: dict | None) -> dict[str, str]:
    if init is None:
        return {"lmp.init_from": "scratch"}
    return {
        "lmp.init_from": init["requested"],
        "lmp.init_model": init["uri"],
        "lmp.init_run_id": init["run_id"] or "",
        "lmp.init_weights_digest": init["weights_digest"],
    }


@task(name="register", **OPTS)
def register(
    dataset: dict, encoded: dict, trained: dict, evaluated: dict, init: dict | None, spec: ClassifierSpec,
    run_id: str, workdir: str,
) -> dict:  # fmt: skip
    """Register the classifier (@challenger) and run the macro-F1 gate against @champion."""
    files = stages.export(
        trained["checkpoint"], encoded, backbone(encoded), spec.head, Path(workdir) / "runs" / run_id / "export"
    )
    tags = {
        "task": "classification",
        "labels": json.dumps(encoded["labels"]),
        **lineage_tags(init),
        **{k: f"{v:.6g}" for k, v in evaluated["metrics"].items() if "_precision_" not in k and "_recall_" not in k},
    }
    example = evaluated["samples"][0]["text"] if evaluated["samples"] else "text"
    return tasks.register_model(
        spec, run_id, files, encoded, tags, example, Path(dataset["path"]), workdir,
        objective="classification", labels=encoded["labels"],
    )  # fmt: skip


@task(name="report", **OPTS)
def report(
    encoded: dict, trained: dict, evaluated: dict, registered: dict, init: dict | None, spec, run_id: str
) -> str:
    return classify_report.publish(spec, run_id, encoded, trained, evaluated, registered, init)


def run(spec: ClassifierSpec, run_id: str, workdir: str, base_dir: str, resume, retry: dict) -> dict:
    """The classification stages inside ``lm_pipeline``'s tracked run; returns what ``lmp run`` prints."""
    init = None if spec.scratch else init_model.with_options(**retry)(spec.init_from, workdir)
    tracking.set_tags(run_id, lineage_tags(init))
    dataset = ingest.with_options(**retry)(spec, workdir, base_dir)
    encoded = tokenize.with_options(**retry)(dataset, spec, init, workdir)
    if resume is None:
        backbone_params = flatten({"model": encoded["model"]}) | {"tokenizer.kind": encoded["tokenizer_source"]}
        tracking.log_params(run_id, backbone_params if init else {})
        classify_report.log_labelled_dataset(run_id, dataset, describe(spec.data))
    tracking.set_tags(run_id, {"data_digest": dataset["digest"], "tokenizer_digest": encoded["tokenizer_digest"]})
    train = tasks.train.with_options(**retry, timeout_seconds=spec.timeout_seconds)
    trained = train(encoded, spec, run_id, workdir, str(resume.checkpoint) if resume else None)
    evaluated = evaluate.with_options(**retry)(encoded, trained, spec, run_id)
    registered = register.with_options(**retry)(dataset, encoded, trained, evaluated, init, spec, run_id, workdir)
    report.with_options(**retry)(encoded, trained, evaluated, registered, init, spec, run_id)
    record_success(workdir, spec.name, dataset["inputs"], encoded["inputs"])
    return {
        "run_id": run_id,
        "metrics": evaluated["metrics"],
        "sample": classify_report.predictions_text(evaluated["samples"]),
        "registered": registered,
        "train": trained,
        "data_digest": dataset["digest"],
        "stages": {"ingest": dataset["cached"], "tokenize": encoded["cached"]},
        "resumed_from_step": resume.step if resume else None,
        "init": init,
    }
