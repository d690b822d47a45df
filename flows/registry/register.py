"""Log the pickle-free pyfunc and register it as a new version of the pipeline's model."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema

import lm
from flows.config import PromoteConfig
from flows.registry import promotion
from lm.checkpoint import sha256_file
from lm.generation import GENERATION_DEFAULTS

SERVING_FILE = Path(__file__).with_name("serving.py")
LM_DIR = Path(lm.__file__).parent


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit of the working tree, or ``unknown`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def requirements() -> list[str]:
    import numpy
    import pydantic
    import safetensors
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={numpy.__version__}",
        f"pydantic=={pydantic.VERSION}",
    ]


def log_model(
    run_id: str,
    files: Mapping[str, str],
    example_prompt: str,
    *,
    objective: str,
    width: int = 1,
    labels: list[str] | None = None,
):
    """Log the pickle-free pyfunc into ``run_id``. A causal model is packaged text → text (generation
    params in the signature); an encoder text → feature vector of ``width`` floats; a classifier
    text → {"label", "probabilities": {label: p}}."""
    params = dict(GENERATION_DEFAULTS)
    example_output = [example_prompt + "..."] if objective == "causal" else [[0.0] * width]
    if objective == "classification":
        params = None
        example_output = [{"label": labels[0], "probabilities": {name: 1.0 / len(labels) for name in labels}}]
    signature = infer_signature([example_prompt], example_output, params=params)
    # Inputs typed "any": for a string column MLflow's request parsing turns 123 into "123" and null into
    # "None"; typed "any", the values reach the model as sent, and it answers anything but strings with a 400.
    signature.inputs = Schema([ColSpec(AnyType())])
    # Model.log with run_id (what mlflow.pyfunc.log_model calls) leaves the run RUNNING: `with
    # mlflow.start_run(run_id)` would end it FINISHED before the version is registered and the aliases moved.
    # Without an active run the logged model must be created in the run's experiment explicitly.
    run = MlflowClient().get_run(run_id)
    model = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=run.data.params, experiment_id=run.info.experiment_id
    )
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model.model_id,
        python_model=str(SERVING_FILE),
        artifacts=dict(files),
        code_paths=[str(LM_DIR)],
        signature=signature,
        input_example=([example_prompt], params | {"max_new_tokens": 8}) if params else [example_prompt],
        pip_requirements=requirements(),
    )


def log_and_register(
    run_id: str,
    name: str,
    files: Mapping[str, str],
    tags: Mapping[str, str],
    example_prompt: str,
    *,
    promote: PromoteConfig,
    objective: str = "causal",
    width: int = 1,
    labels: list[str] | None = None,
    evaluate_champion: Callable | None = None,
) -> dict:
    """Log the model, register it (or find the version that already holds these weights), run the gate
    and move the aliases — @challenger, and @champion/@previous when it passes — as one unit, under the
    model's promotion lock. The run stays RUNNING throughout: the caller's tracked run ends it."""
    client = MlflowClient()
    version, created = promotion.register_version(
        client,
        name,
        run_id,
        dict(tags),
        sha256_file(Path(files["weights"])),
        lambda: log_model(run_id, files, example_prompt, objective=objective, width=width, labels=labels).model_uri,
    )
    challenger = {"challenger": int(version.version)}
    decision = None
    if promote.auto:  # a lost race on a tracking server: decide again against the new champion
        decision = promotion.run_gate(
            client, name, version, promote, evaluate_champion, reason=f"gate after run {run_id}", moves=challenger,
            attempts=3,
        )  # fmt: skip
    else:
        with promotion.model_lock(name):
            promotion.move_aliases(client, name, challenger)
    client.set_tag(run_id, "lmp.registered_version", str(version.version))
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "model_uri": version.source,
        "created": created,
        "decision": asdict(decision) if decision else None,
    }


PACKAGE_FILES = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}


def package_files(where: Path) -> dict[str, Path] | None:
    """The weights, config and tokenizer of a downloaded model package under ``where`` (None if incomplete)."""
    found = {key: next(Path(where).rglob(name), None) for key, name in PACKAGE_FILES.items()}
    return None if None in found.values() else found


def download_package(name: str, version: int | str, dest: Path) -> dict[str, Path]:
    """Download a registered version's package files into ``dest`` (replaced whole, atomically)."""
    from lm.atomic import atomic_dir

    with atomic_dir(Path(dest)) as tmp:
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
    files = package_files(dest)
    if files is None:
        raise FileNotFoundError(f"models:/{name}/{version} lacks one of {sorted(PACKAGE_FILES.values())}")
    return files


def champion_evaluator(spec, data_path: Path, scratch: Path) -> Callable:
    """``evaluate_champion(version) → metric`` for the gate: the champion's packaged files downloaded and
    evaluated as ``spec`` evaluates on this run's validation data at ``data_path`` — the corpus of a
    language model, the labelled examples of a classifier (NaN when the classifier's classes differ)."""
    from lm import stages
    from lm.classification import stages as classification
    from lm.training import resolve_device, resolve_precision

    evaluate_files = classification.evaluate_files if spec.task == "classification" else stages.evaluate_files

    def evaluate_champion(version) -> float:
        files = download_package(version.name, version.version, Path(scratch) / f"champion-v{version.version}")
        device = resolve_device(spec.train.device)
        metrics = evaluate_files(
            files,
            data_path,
            batch_size=spec.train.batch_size,
            device=device,
            autocast_dtype=resolve_precision(spec.train.precision, device),
        )
        return metrics.get(spec.promote.metric, float("nan"))

    return evaluate_champion
