"""Log the pickle-free pyfunc and register it as a new version of the pipeline's model."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import lm
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


def log_and_register(
    run_id: str,
    name: str,
    files: Mapping[str, str],
    tags: Mapping[str, str],
    example_prompt: str,
    *,
    objective: str = "causal",
    width: int = 1,
) -> dict:
    """Log the model into ``run_id`` and create a new version of registered model ``name``.

    A causal model is packaged text → text (generation params in the signature); an encoder
    text → feature vector of ``width`` floats.
    """
    params = dict(GENERATION_DEFAULTS)
    example_output = [example_prompt + "..."] if objective == "causal" else [[0.0] * width]
    signature = infer_signature([example_prompt], example_output, params=params)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_FILE),
            artifacts=dict(files),
            code_paths=[str(LM_DIR)],
            signature=signature,
            input_example=([example_prompt], params | {"max_new_tokens": 8}),
            pip_requirements=requirements(),
        )
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"Language model trained by pipeline {name!r}.")
    version = mlflow.register_model(info.model_uri, name, tags=dict(tags))
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"models:/{name}/{version.version}",
        "model_uri": info.model_uri,
    }
