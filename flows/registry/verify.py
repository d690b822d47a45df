"""`lmp verify`: re-run what produced a registered version and say whether it comes out the same.

A fresh run records what a replay needs beside its params (``record``): the validated spec
(``lmp/pipeline.json``) and the machine it trained on (``lmp/environment.json``). ``verify`` rebuilds the
version's data and tokens with the task's own code (from cache when unchanged), replays the first N training
steps from the recorded spec and seed, and compares digests, the logged ``train_loss`` history and, when the
whole run was replayed, the weights; the verdict is recorded as ``lmp.verify.*`` tags on the version.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, ValidationError

from flows.config import INIT_URI, validate_spec
from flows.registry.register import git_commit, init_model, resolve_init
from lm import tasks
from lm.checkpoint import sha256_file
from lm.config import TrainConfig
from lm.errors import DataError
from lm.perf import _cpu_model
from lm.results import Encoded, Init
from lm.runtime import TrainingError, bf16_supported, resolve_runtime
from lm.training import TrainingInterrupted

RECORD_DIR = "lmp"
SPEC_FILE, ENVIRONMENT_FILE = "pipeline.json", "environment.json"
TOLERANCE = 1e-4
"""Largest relative difference of a logged training loss still called "within tolerance"."""
DIGEST_CHARS = 12
ENVIRONMENT_LABELS = {
    "torch": "torch", "threads": "threads", "python": "python", "platform": "platform", "cpu": "CPU",
    "native_bf16": "native bf16", "device": "device", "gpu": "GPU", "precision": "precision",
    "processes": "processes",
}  # fmt: skip
REASONS = (
    "another torch version, thread count, device or precision (bf16 rounds differently on hardware with and "
    "without native bf16) changes floating-point results: these are the usual reasons a replay differs"
)
TAG = "lmp.verify."


# ---------------------------------------------------------------------------------------------- recording
def environment(train: TrainConfig, processes: int = 1) -> dict:
    """This machine as a replay of ``train`` sees it: versions, threads, processor, and the device and
    precision the config resolves to here."""
    try:
        runtime = resolve_runtime(train)
        device, precision = runtime.device, "bf16" if runtime.amp_dtype == torch.bfloat16 else "fp32"
    except TrainingError:  # train.device: cuda on a machine without one
        device, precision = torch.device(train.device), train.precision
    found = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "native_bf16": bf16_supported(torch.device("cpu")),
        "device": device.type,
        "precision": precision,
        "processes": processes,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def record(run_id: str, spec) -> None:
    """Log what `lmp verify` replays into a fresh run: the validated spec and this machine."""
    distributed = spec.train.distributed
    processes = distributed.world_size if distributed is not None else 1
    client = MlflowClient()
    client.log_dict(run_id, spec.model_dump(mode="json"), f"{RECORD_DIR}/{SPEC_FILE}")
    client.log_dict(run_id, environment(spec.train, processes), f"{RECORD_DIR}/{ENVIRONMENT_FILE}")


# ---------------------------------------------------------------------------------------------- the verdict
class Check(BaseModel):
    """One compared item: its outcome, the sentence `lmp verify` prints and the short tag value."""

    model_config = ConfigDict(frozen=True)
    outcome: Literal["identical", "within tolerance", "different", "not compared"]
    detail: str
    tag: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("identical", "within tolerance")


SKIPPED = Check(outcome="not compared", detail="not compared: the data changed", tag="not compared")


class Verdict(BaseModel):
    """What replaying a registered version found, item by item."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: int
    run_id: str
    steps: int
    """Training steps replayed."""
    max_steps: int
    data: Check
    tokenizer: Check
    loss: Check
    weights: Check
    environment: list[str]
    """How this machine differs from the run's (``threads 2 → 1``); empty when it does not."""
    explanation: str = ""
    """Why the loss or the weights may differ, when they do."""

    @property
    def passed(self) -> bool:
        """Data, tokenizer and loss history identical or within tolerance, the weights too when compared."""
        compared = self.weights.outcome != "not compared"
        return self.data.ok and self.tokenizer.ok and self.loss.ok and (self.weights.ok or not compared)

    def tags(self, at: str) -> dict[str, str]:
        return {
            f"{TAG}data": self.data.tag,
            f"{TAG}tokenizer": self.tokenizer.tag,
            f"{TAG}loss": self.loss.tag,
            f"{TAG}weights": self.weights.tag,
            f"{TAG}environment": "; ".join(self.environment)[:1000] or "same",
            f"{TAG}steps": f"{self.steps}/{self.max_steps}",
            f"{TAG}at": at,
        }


def summary(tags: Mapping[str, str]) -> str:
    """A version's last verification in a few words (`lmp models`): ``identical 40/40 steps``, ``data
    changed`` …; empty when it was never verified."""
    if f"{TAG}at" not in tags:
        return ""
    for item in ("data", "tokenizer", "loss", "weights"):
        if tags.get(f"{TAG}{item}", "").startswith(("changed", "different")):
            return f"{item} different" if item != "data" else "data changed"
    loss = tags.get(f"{TAG}loss", "")
    word = "within tolerance" if loss.startswith("within") else "identical" if loss.startswith("identical") else loss
    return f"{word} {tags.get(f'{TAG}steps', '')} steps"


def compare_digests(item: str, recorded: str | None, now: str, where: str = "") -> Check:
    """``identical`` or ``changed: recorded <12 hex> → now <12 hex>`` (``where``: what was read, appended)."""
    suffix = f" ({where})" if where else ""
    if not recorded:
        return Check(outcome="not compared", detail=f"the version has no {item} digest tag", tag="not compared")
    if recorded == now:
        return Check(outcome="identical", detail=f"identical: digest {now[:DIGEST_CHARS]}{suffix}", tag="identical")
    change = f"changed: recorded {recorded[:DIGEST_CHARS]} → now {now[:DIGEST_CHARS]}"
    return Check(outcome="different", detail=change + suffix, tag=change)


def compare_history(recorded: Mapping[int, float], replayed: Mapping[int, float], upto: int,
                    log_interval: int) -> Check:  # fmt: skip
    """The run's logged ``train_loss`` against the replay's at every recorded step ≤ ``upto``: bit-equal, within
    ``TOLERANCE`` (relative), or the first step where they part."""
    steps = sorted(s for s in recorded if s <= upto)
    where = f"every {log_interval} steps, each the mean of its window: the history is compared at those steps"
    if not steps:
        return Check(outcome="not compared", detail=f"no train_loss was logged up to step {upto} ({where})",
                     tag="not compared")  # fmt: skip
    worst = 0.0
    for step in steps:
        was, now = recorded[step], replayed.get(step)
        same = now is not None and (was == now or (math.isnan(was) and math.isnan(now)))
        gap = 0.0 if same or now is None else abs(was - now) / max(abs(was), abs(now), 1e-30)
        if now is None or not gap <= TOLERANCE:
            shown = "not logged" if now is None else f"{now!r}"
            text = f"different from step {step} (recorded {was!r}, replay {shown})"
            return Check(outcome="different", detail=f"{text}; logged {where}", tag=text)
        worst = max(worst, gap)
    counted = f"at the {len(steps)} logged steps up to step {steps[-1]}"
    if worst == 0.0:
        return Check(outcome="identical", detail=f"identical {counted} (logged {where})", tag="identical")
    text = f"within tolerance: max relative difference {worst:.2g} (≤ {TOLERANCE:g})"
    return Check(outcome="within tolerance", detail=f"{text} {counted} (logged {where})", tag=text)


def differences(recorded: Mapping, now: Mapping) -> list[str]:
    """``threads 2 → 1``, one per item of the environment that differs."""
    return [
        f"{label} {_shown(recorded.get(key))} → {_shown(now.get(key))}"
        for key, label in ENVIRONMENT_LABELS.items()
        if recorded.get(key) != now.get(key)
    ]


def _shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


# ---------------------------------------------------------------------------------------------- the replay
@dataclass(frozen=True)
class Replay:
    steps: int
    losses: dict[int, float]
    weights_digest: str | None
    """The final package weights' sha256; None when stopped before the end."""


def replay_steps(train: TrainConfig, requested: int | None) -> int:
    """``--steps``, else the first checkpoint interval when the run had a shorter one, else every step."""
    if requested is not None:
        if requested > train.max_steps:
            raise DataError(f"--steps {requested}: the run trained {train.max_steps} steps (train.max_steps)")
        return requested
    every = train.checkpoint_interval
    return every if 0 < every < train.max_steps else train.max_steps


def replay(task, encoded: Encoded, init: Init | None, steps: int, scratch: Path) -> Replay:
    """Train from the recorded spec and seed for ``steps`` steps (max_steps unchanged: the learning-rate schedule
    depends on it) and collect the ``train_loss`` the run logged. ``should_stop`` is asked once after each step
    taken, so the count of its calls is the step count."""
    losses: dict[int, float] = {}
    asked = itertools.count(1)

    def on_metrics(step: int, metrics: Mapping[str, float]) -> None:
        if "train_loss" in metrics:
            losses[step] = float(metrics["train_loss"])

    try:
        trained = task.fit(encoded, init, scratch / "train", on_metrics=on_metrics,
                           should_stop=lambda: next(asked) >= steps)  # fmt: skip
    except TrainingInterrupted as stop:
        return Replay(stop.step, losses, None)
    package = task.export(encoded, trained, init, scratch / "export")  # the weights file the package holds
    return Replay(trained.steps, losses, sha256_file(Path(package.weights)))


@contextmanager
def torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the block (nothing when None)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- verify
def verify(model_uri: str, workdir: Path, base_dir: Path, steps: int | None = None, threads: int | None = None,
           precision: str | None = None) -> Verdict:  # fmt: skip
    """Replay what produced the registered version ``model_uri`` (``models:/NAME@ALIAS`` or ``/VERSION``) under
    ``workdir`` (data paths relative to ``base_dir``), record the verdict as ``lmp.verify.*`` tags on the
    version and return it. ``threads`` / ``precision`` force them for the replay. DataError: an unknown model,
    or a version without the recording."""
    client = MlflowClient()
    if not INIT_URI.match(model_uri):
        raise DataError(f"lmp verify {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    version = resolve_init(model_uri, client, what="lmp verify")
    recorded_spec, recorded_env = _recorded(client, version)
    spec = _spec(recorded_spec, precision, version)
    task, workdir, tags = tasks.of(spec), Path(workdir), version.tags
    n = replay_steps(spec.train, steps)
    init = _init(task, tags, workdir)
    prepared = task.prepare(workdir / task.data_root, base_dir=Path(base_dir))
    source = f"{task.describe()}, {'from cache' if prepared.cached else 're-ingested'}"
    data = compare_digests("data", tags.get("data_digest"), prepared.digest, source)
    with torch_threads(threads):
        now_env = environment(spec.train)
        if data.outcome == "different":
            done, tokenizer, loss, weights = 0, SKIPPED, SKIPPED, SKIPPED  # replaying other data tells nothing
        else:
            done, tokenizer, loss, weights = _rerun(task, spec.train, prepared, init, n, workdir, version, client)
    diffs = differences(recorded_env, now_env) + _code_difference(tags.get("git_commit"), git_commit(Path(base_dir)))
    verdict = Verdict(
        name=version.name, version=int(version.version), run_id=version.run_id, steps=done,
        max_steps=spec.train.max_steps, data=data, tokenizer=tokenizer, loss=loss, weights=weights,
        environment=diffs, explanation=_explanation(loss, weights, diffs),
    )  # fmt: skip
    for key, value in verdict.tags(datetime.now(UTC).isoformat(timespec="seconds")).items():
        client.set_model_version_tag(version.name, version.version, key, value)
    return verdict


def _rerun(task, train: TrainConfig, prepared, init: Init | None, steps: int, workdir: Path, version,
           client: MlflowClient) -> tuple[int, Check, Check, Check]:  # fmt: skip
    """Encode and replay ``steps`` training steps; (steps replayed, tokenizer, loss history, weights)."""
    tags = version.tags
    encoded = task.encode(prepared, init, workdir / task.tokens_root)
    tokenizer = compare_digests("tokenizer", tags.get("tokenizer_digest"), encoded.tokenizer_digest)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="verify-") as scratch:
        replayed = replay(task, encoded, init, steps, Path(scratch))
    loss = compare_history(_history(client, version.run_id), replayed.losses, steps, train.log_interval)
    return replayed.steps, tokenizer, loss, _weights(tags.get("weights_digest"), replayed, train.max_steps)


def _code_difference(recorded: str | None, now: str) -> list[str]:
    """``code git <12 hex> → <12 hex>`` when both commits are known and differ."""
    if "unknown" in (recorded or "unknown", now) or recorded == now:
        return []
    return [f"code git {recorded[:DIGEST_CHARS]} → {now[:DIGEST_CHARS]}"]


def _recorded(client: MlflowClient, version) -> tuple[dict, dict]:
    """The version's run's ``lmp/pipeline.json`` and ``lmp/environment.json``."""
    names = {Path(f.path).name for f in client.list_artifacts(version.run_id, RECORD_DIR)} if version.run_id else set()
    if not {SPEC_FILE, ENVIRONMENT_FILE} <= names:
        raise DataError(
            f"version {version.version} of {version.name} was registered before lmp recorded what verify replays; "
            "run its pipeline again to register a verifiable version"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(version.run_id, RECORD_DIR, tmp))
        return json.loads((local / SPEC_FILE).read_text()), json.loads((local / ENVIRONMENT_FILE).read_text())


def _spec(recorded: dict, precision: str | None, version):
    """The recorded spec, validated by this code (``precision`` forced when given) and runnable here."""
    try:
        spec = validate_spec(recorded)
        spec = spec.overridden({"train.precision": precision}) if precision else spec
        resolve_runtime(spec.train)
        return spec
    except TrainingError as e:  # train.device: cuda, and this machine has none
        raise DataError(f"version {version.version} of {version.name} cannot be replayed here: {e}") from None
    except ValidationError as e:
        raise DataError(
            f"version {version.version} of {version.name}: its recorded pipeline does not validate with this lmp "
            f"({e.error_count()} problem(s), the first: {e.errors()[0]['msg']}); verify it with the lmp that made it"
        ) from None


def _init(task, tags: Mapping[str, str], workdir: Path) -> Init | None:
    """The registered models the run started from: the versions it resolved (its ``lmp.*_model`` tags), not
    whatever the spec's aliases point at now."""
    if not task.init_from():
        return None
    init = init_model(tags.get("lmp.init_model") or task.init_from(), workdir / "init")
    parts = {role: init_model(tags.get(f"lmp.{role}_model") or uri, workdir / "init")
             for role, uri in task.init_parts().items()}  # fmt: skip
    init = init.model_copy(update={"parts": parts}) if parts else init
    task.check_init(init)
    return init


def _history(client: MlflowClient, run_id: str) -> dict[int, float]:
    """The run's logged ``train_loss`` by step (the latest row where a step was logged twice)."""
    rows = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in rows}


def _weights(recorded: str | None, replayed: Replay, max_steps: int) -> Check:
    if replayed.weights_digest is None:
        text = f"not compared (replayed {replayed.steps} of {max_steps} steps)"
        return Check(outcome="not compared", detail=text, tag=text)
    if not recorded:
        return Check(outcome="not compared", detail="the version has no weights_digest tag", tag="not compared")
    if recorded == replayed.weights_digest:
        return Check(outcome="identical", detail=f"identical: sha256 {recorded[:DIGEST_CHARS]}", tag="identical")
    text = f"different: recorded {recorded[:DIGEST_CHARS]} → replay {replayed.weights_digest[:DIGEST_CHARS]}"
    return Check(outcome="different", detail=text, tag=text)


def _explanation(loss: Check, weights: Check, diffs: list[str]) -> str:
    """Why the replay may differ, when the loss or the weights do."""
    if loss.ok and weights.outcome != "different":
        return ""
    if loss.outcome == "not compared" and weights.outcome == "not compared":
        return ""
    if diffs:
        return f"this machine differs from the run's ({'; '.join(diffs)}): {REASONS}"
    return (
        "this machine matches what the run recorded (torch, threads, processor, device, precision): the "
        "difference comes from the code or from something the recording does not capture"
    )
