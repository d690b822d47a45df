"""Registered versions, the promotion gate and alias moves (@challenger, @champion, @previous).

A run's model becomes a version of the pipeline's registered model — reused, not duplicated, when a
version with the same weights digest exists — and gets ``@challenger``. The gate (``promote:`` in
pipelines.yaml) compares the challenger's metric with ``@champion``'s *on the same evaluation data*:
the champion's recorded metric when it was evaluated on the same data digest, otherwise the champion
re-evaluated on the challenger's data. If the gate passes, or there is no champion, ``@champion``
moves to the challenger and the old champion becomes ``@previous``. Every decision, with both numbers,
is recorded as tags on the challenger version. Alias moves are all-or-nothing: if one fails, the
aliases are put back as they were.
"""

from __future__ import annotations

import getpass
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.config import PromoteConfig

ALIASES = ("challenger", "champion", "previous")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None
    champion_version: int | None
    forced_by: str | None = None

    def tags(self) -> dict[str, str]:
        """The decision as version tags (``lmp.gate.*``)."""
        return {
            f"lmp.gate.{k}": "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            for k, v in asdict(self).items()
        } | {"lmp.gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def gate(cfg: PromoteConfig, challenger: float, champion: float | None) -> tuple[bool, str]:
    """The declarative gate as a pure function: (passes, why)."""
    name = cfg.metric
    if cfg.require_finite and not math.isfinite(challenger):
        return False, f"challenger {name} is {challenger}, not finite"
    if champion is None:
        return True, "no champion yet"
    if not math.isfinite(champion):
        return True, f"champion {name} is {champion}, not finite"
    improvement = champion - challenger if cfg.mode == "min" else challenger - champion
    verdict = "≥" if improvement >= cfg.min_improvement else "<"
    return (
        improvement >= cfg.min_improvement,
        f"{name} {challenger:.6g} vs champion {champion:.6g}: improvement {improvement:.6g} {verdict} "
        f"min_improvement {cfg.min_improvement:g} ({cfg.mode})",
    )


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_version(
    client: MlflowClient,
    name: str,
    run_id: str,
    tags: dict[str, str],
    weights_digest: str,
    log_model: Callable[[], str],
) -> tuple[ModelVersion, bool]:
    """The version holding these weights: found by ``weights_digest``, or created from the model
    ``log_model()`` logs (called only then). Returns (version, created)."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"Language model trained by pipeline {name!r}.")
    found = client.search_model_versions(f"name = '{name}' and tags.weights_digest = '{weights_digest}'")
    if found:
        return max(found, key=lambda v: int(v.version)), False
    model_uri = log_model()
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None  # a logged model
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=dict(tags) | {"weights_digest": weights_digest}, model_id=model_id
    )
    return version, True


def move_aliases(client: MlflowClient, name: str, moves: dict[str, int | None]) -> None:
    """Set (or, for None, delete) several aliases as one unit: on any failure restore all of them."""
    before = {alias: alias_version(client, name, alias) for alias in moves}
    try:
        for alias, version in moves.items():
            if version is None:
                if before[alias] is not None:
                    client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, str(version))
    except BaseException:
        for alias, old in before.items():
            try:
                if old is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, old.version)
            except MlflowException:
                pass
        raise


def metric_of(version: ModelVersion, metric: str) -> float:
    try:
        return float(version.tags[metric])
    except (KeyError, ValueError):
        return math.nan


def decide(
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    cfg: PromoteConfig,
    evaluate_champion: Callable[[ModelVersion], float] | None = None,
    *,
    force: bool = False,
) -> Decision:
    """Run the gate for ``version`` against the current champion (nothing is moved)."""
    champion = alias_version(client, name, "champion")
    challenger_value = metric_of(version, cfg.metric)
    champion_value = None
    if champion is not None and champion.version != version.version:
        same_data = champion.tags.get("data_digest") == version.tags.get("data_digest")
        if same_data or evaluate_champion is None:
            champion_value = metric_of(champion, cfg.metric)
        else:
            champion_value = evaluate_champion(champion)
    if champion is not None and champion.version == version.version:
        passed, reason = False, f"version {version.version} is already the champion"
    else:
        passed, reason = gate(cfg, challenger_value, champion_value)
    forced_by = None
    if force and not passed:
        forced_by = getpass.getuser()
        passed, reason = True, f"forced by {forced_by}; the gate said: {reason}"
    return Decision(
        promoted=passed,
        reason=reason,
        metric=cfg.metric,
        challenger=challenger_value,
        champion=champion_value,
        champion_version=int(champion.version) if champion is not None else None,
        forced_by=forced_by,
    )


def apply(client: MlflowClient, name: str, version: ModelVersion, decision: Decision) -> None:
    """Record the decision on the version; move @champion (and @previous) when it promotes."""
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version.version, key, value)
    if decision.promoted:
        moves = {"champion": int(version.version)}
        if decision.champion_version is not None:
            moves = {"previous": decision.champion_version} | moves
        move_aliases(client, name, moves)


def rollback(client: MlflowClient, name: str) -> tuple[int, int]:
    """``@champion`` ← ``@previous`` (which is then cleared); returns (restored, demoted) versions."""
    previous, champion = alias_version(client, name, "previous"), alias_version(client, name, "champion")
    if previous is None:
        raise LookupError(f"registered model {name!r} has no @previous version to roll back to")
    move_aliases(client, name, {"champion": int(previous.version), "previous": None})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, previous.version, "lmp.rollback", f"restored {stamp} by {getpass.getuser()}")
    if champion is not None:
        client.set_model_version_tag(
            name, champion.version, "lmp.rollback", f"demoted {stamp} by {getpass.getuser()} (was champion)"
        )
    return int(previous.version), int(champion.version) if champion is not None else 0
