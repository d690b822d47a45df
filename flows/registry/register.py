"""Log the pickle-free pyfunc and register it as a new version of the pipeline's model."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema
from pydantic import BaseModel, ConfigDict

import lm
from flows.config import HF_INIT, INIT_URI, PromoteConfig
from flows.registry import promotion
from flows.registry.samples import ARTIFACTS, GateCard
from lm import package as packaging
from lm.atomic import atomic_dir
from lm.checkpoint import sha256_file
from lm.errors import DataError
from lm.results import Init, Package, Served

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


def log_model(run_id: str, package: Package, served: Served):
    """Log the pickle-free pyfunc into ``run_id``, with the signature of what the task serves: text → text
    (generation params in the signature), text → a feature vector, text → {"label", "probabilities"} …"""
    signature = infer_signature([served.example_input], served.example_output, params=served.params)
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
    example = [served.example_input]
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model.model_id,
        python_model=str(SERVING_FILE),
        artifacts=package.artifacts(),
        code_paths=[str(LM_DIR)],
        signature=signature,
        input_example=(example, served.params | {"max_new_tokens": 8}) if served.params else example,
        pip_requirements=requirements(),
    )


class Registered(BaseModel):
    """A registered version and the gate's decision about it."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: int
    uri: str
    model_uri: str
    created: bool = True
    """False when the version already held these weights (a rerun): it keeps its card."""
    decision: dict | None = None
    card: str | None = None
    """The generation card's artifact on the run (``gate/generation_card.html``) when the gate made one."""


def log_and_register(
    run_id: str,
    name: str,
    package: Package,
    tags: Mapping[str, str],
    served: Served,
    *,
    promote: PromoteConfig,
    evaluate_champion: Callable | None = None,
    gate_card: Callable[[int], GateCard] | None = None,
) -> Registered:
    """Log the model, register it (or find the version that already holds these weights), run the gate
    and move the aliases — @challenger, and @champion/@previous when it passes — as one unit, under the
    model's promotion lock. The run stays RUNNING throughout: the caller's tracked run ends it.
    ``gate_card(version)``: the generation card the gate builds when the version meets a champion (its rule)."""
    client = MlflowClient()
    version, created = promotion.register_version(
        client,
        name,
        run_id,
        dict(tags),
        sha256_file(Path(package.weights)),
        lambda: log_model(run_id, package, served).model_uri,
    )
    challenger = {"challenger": int(version.version)}
    decision = None
    card = gate_card(int(version.version)) if gate_card is not None else None
    if promote.auto:  # a lost race on a tracking server: decide again against the new champion
        decision = promotion.run_gate(
            client, name, version, promote, evaluate_champion, reason=f"gate after run {run_id}", moves=challenger,
            attempts=3, rule=card,
        )  # fmt: skip
    else:
        with promotion.model_lock(name):
            promotion.move_aliases(client, name, challenger)
    client.set_tag(run_id, "lmp.registered_version", str(version.version))
    return Registered(
        name=name,
        version=int(version.version),
        uri=f"models:/{name}/{version.version}",
        model_uri=version.source,
        created=created,
        decision=asdict(decision) if decision else None,
        card=ARTIFACTS["html"] if card is not None and card.card is not None else None,
    )


def download_package(name: str, version: int | str, dest: Path) -> Package:
    """Download a registered version's package files into ``dest`` (replaced whole, atomically)."""
    with atomic_dir(Path(dest)) as tmp:
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
    found = packaging.find(dest)
    if found is None:
        raise FileNotFoundError(f"models:/{name}/{version} lacks one of {sorted(packaging.FILES.values())}")
    return found


def version_package(version, root: Path) -> Package:
    """A registered version's package under ``root/NAME-vN``: reused when its weights are the version's
    (``weights_digest``), else downloaded."""
    dest = Path(root) / f"{version.name}-v{version.version}"
    digest = version.tags.get("weights_digest")
    found = packaging.find(dest) if dest.exists() else None
    if found is None or (digest and sha256_file(Path(found.weights)) != digest):
        found = download_package(version.name, version.version, dest)
    return found


def _registered_names(client: MlflowClient) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def resolve_init(init_from: str, client: MlflowClient, what: str = "init_from"):
    """The registered version ``init_from`` names; a DataError (starting with ``what``) names what exists when it
    does not."""
    match = INIT_URI.match(init_from)
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = _registered_names(client)
        raise DataError(
            f"{what} {init_from}: there is no registered model {name!r}; the registered models are "
            f"{', '.join(names) if names else '(none)'}. Run its language-model pipeline first (lmp run {name}) "
            "or fix the name"
        ) from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        aliases = sorted(f"@{a}" for a in (model.aliases or {}))
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise DataError(
            f"{what} {init_from}: model {name!r} has no {'alias @' + alias if alias else 'version ' + number}; "
            f"it has aliases {', '.join(aliases) or '(none)'} and versions {versions}"
        ) from None


def import_init(init_from: str, root: Path) -> Init:
    """``hf:PATH``: the Transformers folder converted into a package under ``root`` (re-read every run: the
    folder may have changed; a relative PATH is taken from the working directory)."""
    from lm.export.hf import import_hf

    path = init_from[len(HF_INIT) :].strip()
    folder = Path(path).expanduser().absolute()
    dest = Path(root) / f"hf-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"
    imported = import_hf(path, dest)
    found = packaging.find(dest)
    return Init(requested=init_from, uri=f"{HF_INIT}{folder}", name=folder.name, version=0, run_id=None,
                weights_digest=sha256_file(Path(found.weights)), package=found, model=imported.config["model"],
                vocab_size=imported.config["vocab_size"])  # fmt: skip


def init_model(init_from: str, root: Path) -> Init:
    """The registered model ``init_from`` names, downloaded under ``root`` (reused when its weights are), or the
    Transformers folder an ``hf:PATH`` names, imported."""
    if init_from.startswith(HF_INIT):
        return import_init(init_from, root)
    version = resolve_init(init_from, MlflowClient())
    digest = version.tags.get("weights_digest")
    found = version_package(version, Path(root))
    config = packaging.read_config(found)
    return Init(
        requested=init_from,
        uri=f"models:/{version.name}/{version.version}",
        name=version.name,
        version=int(version.version),
        run_id=version.run_id,
        weights_digest=digest or sha256_file(Path(found.weights)),
        package=found,
        model=config["model"],
        vocab_size=config["vocab_size"],
    )


def champion_evaluator(spec, data_path: Path, scratch: Path) -> Callable:
    """``evaluate_champion(version) → metric`` for the gate: the champion's package (``version_package`` under
    ``scratch``, which the generation card shares) scored by the spec's task on this run's validation data at
    ``data_path`` (NaN where it cannot be compared)."""
    from lm import tasks
    from lm.runtime import resolve_runtime

    task = tasks.of(spec)

    def evaluate_champion(version) -> float:
        metrics = task.evaluate_package(version_package(version, Path(scratch)), data_path, resolve_runtime(spec.train))
        return metrics.get(spec.promote.metric, float("nan"))

    return evaluate_champion
