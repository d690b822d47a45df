"""Log the pickle-free pyfunc and register it as a new version of the pipeline's model."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import lm
from flows import promotion
from flows.config import PromoteConfig
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


def log_model(run_id: str, files: Mapping[str, str], example_prompt: str, *, objective: str, width: int):
    """Log the pickle-free pyfunc into ``run_id``. A causal model is packaged text → text (generation
    params in the signature); an encoder text → feature vector of ``width`` floats."""
    params = dict(GENERATION_DEFAULTS)
    example_output = [example_prompt + "..."] if objective == "causal" else [[0.0] * width]
    signature = infer_signature([example_prompt], example_output, params=params)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_FILE),
            artifacts=dict(files),
            code_paths=[str(LM_DIR)],
            signature=signature,
            input_example=([example_prompt], params | {"max_new_tokens": 8}),
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
    evaluate_champion: Callable | None = None,
) -> dict:
    """Log the model, register it (or find the version that already holds these weights), run the gate
    and move the aliases — @challenger, and @champion/@previous when it passes — as one unit."""
    client = MlflowClient()
    version, created = promotion.register_version(
        client,
        name,
        run_id,
        dict(tags),
        sha256_file(Path(files["weights"])),
        lambda: log_model(run_id, files, example_prompt, objective=objective, width=width).model_uri,
    )
    moves: dict[str, int | None] = {"challenger": int(version.version)}
    decision = None
    if promote.auto:
        decision = promotion.decide(client, name, version, promote, evaluate_champion)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version.version, key, value)
        if decision.promoted:
            if decision.champion_version is not None:
                moves["previous"] = decision.champion_version
            moves["champion"] = int(version.version)
    promotion.move_aliases(client, name, moves)
    client.set_tag(run_id, "lmp.registered_version", str(version.version))
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "model_uri": version.source,
        "created": created,
        "decision": asdict(decision) if decision else None,
    }


def champion_evaluator(spec, corpus_path: Path, scratch: Path) -> Callable:
    """``evaluate_champion(version) → metric`` for the gate: the champion's packaged files downloaded and
    evaluated on the validation text at ``corpus_path`` (the challenger's data), as ``spec`` evaluates."""
    from lm import stages
    from lm.training import resolve_device, resolve_precision

    def evaluate_champion(version) -> float:
        out = Path(scratch) / f"champion-v{version.version}"
        uri = f"models:/{version.name}/{version.version}"
        where = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(out)))
        names = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
        files = {key: next(where.rglob(name)) for key, name in names.items()}
        device = resolve_device(spec.train.device)
        metrics = stages.evaluate_files(
            files,
            corpus_path,
            batch_size=spec.train.batch_size,
            device=device,
            autocast_dtype=resolve_precision(spec.train.precision, device),
        )
        return metrics[spec.promote.metric]

    return evaluate_champion
