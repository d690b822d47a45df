"""Registered versions, the promotion gate and alias moves (@challenger, @champion, @previous).

A run's model becomes a version of the pipeline's registered model — reused, not duplicated, when a
version with the same weights digest exists — and gets ``@challenger``. The gate (``promote:`` in
pipelines.yaml) compares the challenger's metric with ``@champion``'s *on the same evaluation data*:
the champion's recorded metric when it was evaluated on the same data digest, otherwise the champion
re-evaluated on the challenger's data. If the gate passes, or there is no champion, ``@champion``
moves to the challenger and the old champion becomes ``@previous``. Every decision, with both numbers,
is recorded as tags on the challenger version. Alias moves are all-or-nothing: if one fails, the
aliases are put back as they were.

Promotion is atomic across processes: decide + apply run under one lock per registered model (a file lock
beside a local store, ``mlruns/locks/<model>.lock``), and apply is a compare-and-set — @champion is re-read
just before moving and the move is aborted if it changed since the decision (the only guard on a tracking
server). Every decision, rollback and replacement is appended to the version's promotion history: one
``lmp.history.<UTC time>-<n>`` tag per event, a JSON object, never overwritten. The ``lmp.gate.*`` tags
hold only the latest decision.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.config import PromoteConfig

ALIASES = ("challenger", "champion", "previous")
HISTORY = "lmp.history."  # tag prefix of the append-only promotion history
Rule = Callable[[ModelVersion], "tuple[str, str] | None"]
"""A gate rule beyond the metric: given the champion, None (passes) or (the rule's key, why it refuses)."""
log = logging.getLogger(__name__)


class PromotionConflict(RuntimeError):
    """@champion changed between a gate's decision and its alias move (another promotion won the race)."""


def who() -> str:
    """``user@host`` of this process, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (e.g. an arbitrary uid in a container)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None
    champion_version: int | None
    forced_by: str | None = None
    mode: str = "min"
    min_improvement: float = 0.0
    refused_by: str | None = None
    """The gate rule beyond the metric that refused a challenger the metric let through (e.g.
    ``max_repetition_increase``)."""

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
    ``log_model()`` logs (called only then). Returns (version, created).

    Nothing is registered before the model is fully logged: the registered model and the version are
    created only after ``log_model()`` returned. If logging fails (a full disk), the run's partial logged
    model is marked FAILED and its artifact directory removed, and an OSError says nothing was registered."""
    found = client.search_model_versions(f"name = '{name}' and tags.weights_digest = '{weights_digest}'")
    if found:
        return max(found, key=lambda v: int(v.version)), False
    discard_partial_models(client, run_id)  # what a killed earlier attempt left half-written
    try:
        model_uri = log_model()
    except BaseException as e:
        removed = discard_partial_models(client, run_id)
        if isinstance(e, OSError):  # OSError(errno, …) keeps the subclass (PermissionError, …)
            where = f" (partial model {', '.join(removed)} removed)" if removed else ""
            path = f" ({e.filename})" if e.filename else ""
            raise OSError(
                e.errno,
                f"{e.strerror or e}{path} while logging the model of run {run_id}; nothing was registered{where}",
            ) from e
        raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None  # a logged model
    created_model = _ensure_registered_model(client, name)
    try:
        version = client.create_model_version(
            name, model_uri, run_id=run_id, tags=dict(tags) | {"weights_digest": weights_digest}, model_id=model_id
        )
    except BaseException:
        if created_model and not client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)  # never leave an empty registered model behind
        raise
    return version, True


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create the registered model unless it exists; True when this call created it."""
    if client.search_registered_models(filter_string=f"name = '{name}'"):
        return False
    try:
        client.create_registered_model(name, description=f"Language model trained by pipeline {name!r}.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else: created concurrently by another run
            raise
        return False
    return True


def discard_partial_models(client: MlflowClient, run_id: str) -> list[str]:
    """Logged models of ``run_id`` that never became READY (a failed or killed upload): marked FAILED and
    their artifact directories removed. Returns their ids. Best effort: a failure here is only logged,
    never hides the error being handled."""
    try:
        experiment = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
        partial = [m for m in found if m.status != LoggedModelStatus.READY]
        for model in partial:
            if model.status != LoggedModelStatus.FAILED:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            _delete_artifacts(model.model_id, model.artifact_location)
            client.set_logged_model_tags(model.model_id, {"lmp.discarded": "upload failed; artifacts removed"})
    except Exception as e:
        log.warning("could not clean up the partial models of run %s: %s", run_id, e)
        return []
    return [m.model_id for m in partial]


def _delete_artifacts(model_id: str, location: str) -> None:
    """Remove a logged model's artifacts: the whole ``models/<model_id>/`` directory of a local store."""
    import shutil

    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path))
        shutil.rmtree(path.parent if path.parent.name == model_id else path, ignore_errors=True)
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(location).delete_artifacts()
    except Exception as e:  # a store that cannot delete: the FAILED status still marks it
        log.warning("could not delete the partial artifacts of %s at %s: %s", model_id, location, e)


def move_aliases(
    client: MlflowClient, name: str, moves: dict[str, int | None], *, expect: dict[str, int | None] | None = None
) -> None:
    """Set (or, for None, delete) several aliases as one unit: on any failure restore all of them.
    ``expect``: alias → version the caller decided against; if any differs now, nothing moves
    (PromotionConflict)."""
    before = {alias: alias_version(client, name, alias) for alias in set(moves) | set(expect or {})}
    for alias, wanted in (expect or {}).items():
        if _number(before[alias]) != wanted:
            raise PromotionConflict(_moved_message(name, alias, wanted, _number(before[alias])))
    try:
        for alias, version in moves.items():
            if version is None:
                if before[alias] is not None:
                    client.delete_registered_model_alias(name, alias)
            else:
                set_alias(client, name, alias, version)
    except BaseException:
        for alias, old in before.items():
            try:
                if old is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    set_alias(client, name, alias, old.version)
            except MlflowException:
                pass
        raise


DUPLICATE_KEY = ("duplicate key value", "UNIQUE constraint failed")  # PostgreSQL's words, SQLite's


def set_alias(client: MlflowClient, name: str, alias: str, version: int | str, attempts: int = 3) -> None:
    """Point ``alias`` at ``version``. MLflow's SQL store sets an alias by reading its row, then inserting it when it
    was missing: two clients setting the same new alias at once (two hosts registering against one PostgreSQL-backed
    server) make one of them fail on the alias table's primary key. The row exists by then, so the same request
    again updates it: retried, up to ``attempts`` times in all, for that error only."""
    for attempt in range(1, attempts + 1):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as e:
            if attempt == attempts or not any(words in str(e) for words in DUPLICATE_KEY):
                raise
            log.info("@%s of %r was set by another client at the same moment; setting it again", alias, name)


def _number(version: ModelVersion | None) -> int | None:
    return int(version.version) if version is not None else None


def _moved_message(name: str, alias: str, expected: int | None, found: int | None) -> str:
    def show(v):
        return "none" if v is None else f"v{v}"

    return (
        f"@{alias} of {name!r} moved from {show(expected)} to {show(found)} since the decision (another promotion "
        "ran at the same time); nothing was moved — run the gate again against the new champion"
    )


def lock_path(name: str, uri: str | None = None) -> Path | None:
    """The lock file of registered model ``name`` beside a local store (``<store dir>/locks/<name>.lock``),
    None for a remote one (a tracking server relies on the compare-and-set in ``apply``)."""
    uri = uri or mlflow.get_registry_uri()
    if uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///").split("?")[0]).parent
    elif uri.startswith("file:") or "://" not in uri:
        directory = Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri)
    else:
        return None
    return directory / "locks" / f"{quote(name, safe='')}.lock"


@contextmanager
def model_lock(name: str, uri: str | None = None) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` (other processes and threads wait)."""
    path = lock_path(name, uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # the lock goes with the open file: released on close, even on a crash
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another promotion of %r is in progress; waiting for it (%s)", name, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _value(x: float | None) -> float | str | None:
    """A metric as JSON can hold it (NaN and inf as text)."""
    return x if x is None or math.isfinite(x) else str(x)


def record(client: MlflowClient, name: str, version: int | str, event: str, **fields) -> dict:
    """Append one entry to a version's promotion history (a new ``lmp.history.*`` tag; earlier entries are
    never touched). In every entry ``challenger_version`` is the version taking @champion and
    ``champion_version`` the one holding it before."""
    now = datetime.now(UTC)
    entry = {"event": event, "who": who(), "when": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "reason": ""} | fields
    existing = {k for k in client.get_model_version(name, str(version)).tags if k.startswith(HISTORY)}
    n = len(existing)
    while (key := f"{HISTORY}{now:%Y%m%dT%H%M%S.%fZ}-{n:03d}") in existing:
        n += 1
    client.set_model_version_tag(name, str(version), key, json.dumps(entry, allow_nan=False))
    return entry


def _decision_fields(version: ModelVersion, decision: Decision) -> dict:
    return {
        "forced": decision.forced_by is not None,
        "metric": decision.metric,
        "challenger": _value(decision.challenger),
        "champion": _value(decision.champion),
        "challenger_version": int(version.version),
        "champion_version": decision.champion_version,
        "detail": decision.reason,
    }


def history(client: MlflowClient, name: str, version: int | str | None = None) -> list[dict]:
    """The promotion history of one version (or of every version of ``name``), oldest first per version;
    each entry carries ``model`` and ``version``."""
    if version is not None:
        versions = [client.get_model_version(name, str(version))]
    else:
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    entries = []
    for v in versions:
        for key in sorted(k for k in v.tags if k.startswith(HISTORY)):
            try:
                entry = json.loads(v.tags[key])
            except ValueError:
                entry = {"event": "unreadable", "detail": v.tags[key][:200]}
            entries.append({"model": name, "version": int(v.version)} | entry)
    return entries


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
    rule: Rule | None = None,
) -> Decision:
    """Run the gate for ``version`` against the current champion (nothing is moved). ``rule(champion)``, asked
    whenever the challenger meets another version as champion, may refuse what the metric lets through."""
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
        passed, reason = False, f"version {version.version} is already @champion; nothing to promote"
    else:
        passed, reason = gate(cfg, challenger_value, champion_value)
    meets = champion is not None and champion.version != version.version
    refusal = rule(champion) if rule is not None and meets else None  # asked even when the metric refuses
    refused_by = None
    if refusal is not None and passed:
        refused_by = refusal[0]
        passed, reason = False, f"{refusal[1]} (promote.{refusal[0]}); the metric said: {reason}"
    forced_by = None
    if force and not passed:
        forced_by = who()
        passed, reason = True, f"forced by {forced_by}; the gate said: {reason}"
    return Decision(
        promoted=passed,
        reason=reason,
        metric=cfg.metric,
        challenger=challenger_value,
        champion=champion_value,
        champion_version=int(champion.version) if champion is not None else None,
        forced_by=forced_by,
        mode=cfg.mode,
        min_improvement=cfg.min_improvement,
        refused_by=refused_by if not forced_by else None,
    )


def verdict(decision: Decision | dict | None, version: int, *, created: bool = True) -> str:
    """What the gate decided for ``version``, in one line with both numbers: "promoted to @champion (val_bpc
    2.1 < 2.15 of v3)", "stays @challenger because …", or that the version already is @champion (``created``
    False: the run reproduced that version's weights)."""
    if decision is None:
        return "stays @challenger (promote.auto is false: `lmp promote` runs the gate)"
    d = decision if isinstance(decision, dict) else asdict(decision)
    metric, ours, theirs, holder = d["metric"], d["challenger"], d["champion"], d["champion_version"]
    if holder == int(version) and not d["promoted"]:
        same = "" if created else " (same weights)"
        return f"version {version} is already @champion{same}; nothing to promote"
    if d.get("forced_by"):
        return f"promoted to @champion by force — {d['reason']}"
    if d["promoted"]:
        if theirs is None:
            return f"promoted to @champion (no champion yet; {metric} {ours:.4g})"
        if not math.isfinite(theirs):
            return f"promoted to @champion ({metric} {ours:.4g}; v{holder}'s was {theirs}, not finite)"
        sign = "<" if ours < theirs else (">" if ours > theirs else "=")
        return f"promoted to @champion ({metric} {ours:.4g} {sign} {theirs:.4g} of v{holder})"
    keeps = f" (v{holder} stays @champion)" if holder is not None else ""
    if d.get("refused_by"):
        return f"stays @challenger because {d['reason']}{keeps}"
    if not math.isfinite(ours):
        return f"stays @challenger because its {metric} is {ours}, not finite{keeps}"
    if theirs is None:
        return f"stays @challenger because {d['reason']}"
    return (
        f"stays @challenger because {metric} {ours:.4g} vs {theirs:.4g} of v{holder} (@champion) is not an "
        f"improvement of at least {d.get('min_improvement', 0):g}"
    )


def apply(
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    decision: Decision,
    *,
    reason: str = "",
    moves: dict[str, int | None] | None = None,
) -> None:
    """Record the decision on the version (latest ``lmp.gate.*`` tags and a history entry) and move
    @champion (and @previous) when it promotes, with ``moves`` (e.g. @challenger) in the same unit.

    Compare-and-set: if @champion is no longer the version the decision was made against, nothing is
    moved, the aborted decision goes into the history and PromotionConflict is raised."""
    fields = _decision_fields(version, decision) | {"reason": reason}
    current = _number(alias_version(client, name, "champion"))
    if current != decision.champion_version:
        message = _moved_message(name, "champion", decision.champion_version, current)
        record(client, name, version.version, "aborted", **fields | {"detail": f"{message}; the gate said: "
                                                                     f"{decision.reason}"})  # fmt: skip
        raise PromotionConflict(message)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version.version, key, value)
    event = ("forced" if decision.forced_by else "promoted") if decision.promoted else "rejected"
    record(client, name, version.version, event, **fields)
    moves = dict(moves or {})
    if decision.promoted:
        moves["champion"] = int(version.version)
        if decision.champion_version is not None:
            moves = {"previous": decision.champion_version} | moves
    if not moves:
        return
    try:
        move_aliases(client, name, moves, expect={"champion": decision.champion_version})
    except BaseException as e:
        try:
            event = "aborted" if isinstance(e, PromotionConflict) else "failed"
            record(client, name, version.version, event, **fields | {"detail": f"aliases unchanged: {e}"[:2000]})
        except Exception:  # the registry itself is failing: the original error matters more
            pass
        raise
    if decision.promoted and decision.champion_version is not None:
        record(client, name, decision.champion_version, "replaced", **fields | {"detail": "now @previous"})


def run_gate(
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    cfg: PromoteConfig,
    evaluate_champion: Callable[[ModelVersion], float] | None = None,
    *,
    force: bool = False,
    reason: str = "",
    moves: dict[str, int | None] | None = None,
    attempts: int = 1,
    rule: Rule | None = None,
) -> Decision:
    """Decide and apply under the model's promotion lock. On a lost compare-and-set race (only possible
    without a local lock) decide again against the new champion, up to ``attempts`` times in all."""
    with model_lock(name):
        for attempt in range(1, attempts + 1):
            decision = decide(client, name, version, cfg, evaluate_champion, force=force, rule=rule)
            try:
                apply(client, name, version, decision, reason=reason, moves=moves)
                return decision
            except PromotionConflict:
                if attempt == attempts:
                    raise
                log.warning("@champion of %r moved during the gate of v%s; deciding again", name, version.version)
    raise AssertionError("unreachable")


def rollback(client: MlflowClient, name: str, *, reason: str = "") -> tuple[int, int]:
    """``@champion`` ← ``@previous`` (which is then cleared), under the promotion lock; recorded in both
    versions' histories. Returns (restored, demoted) versions."""
    with model_lock(name):
        previous, champion = alias_version(client, name, "previous"), alias_version(client, name, "champion")
        if previous is None:
            raise LookupError(f"registered model {name!r} has no @previous version to roll back to")
        restored, demoted = int(previous.version), _number(champion)
        move_aliases(client, name, {"champion": restored, "previous": None}, expect={"champion": demoted})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fields = {"reason": reason, "forced": False, "challenger_version": restored, "champion_version": demoted}
        record(client, name, restored, "restored", **fields | {"detail": "rollback: @previous made @champion"})
        client.set_model_version_tag(name, previous.version, "lmp.rollback", f"restored {stamp} by {who()}")
        if champion is not None:
            record(client, name, demoted, "rolled back", **fields | {"detail": "rollback: demoted from @champion"})
            client.set_model_version_tag(
                name, champion.version, "lmp.rollback", f"demoted {stamp} by {who()} (was champion)"
            )
    return restored, demoted or 0
