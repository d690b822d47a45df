"""`lmp gc`: give back the disk space the work directory (``.lmp``) accumulates, without breaking anything.

What goes, by category:

- checkpoints: the directories of runs (``.lmp/runs/<run id>``: step checkpoints, ``final/``, ``export/``) that
  finished, beyond the newest ``--keep-last`` per pipeline; of runs deleted in MLflow; and of interrupted runs a
  newer run superseded (``lmp run`` resumes only a pipeline's newest run). Registered versions live in the
  MLflow artifact store (``mlruns/``), which gc never touches.
- caches: stage caches (corpora, token files, labelled examples and their encodings, downloaded init models)
  that neither the current ``pipelines.yaml`` (any pipeline, its schedule and sweep variants) nor a resumable
  or live run was made from, and the index entries that point at them.
- temp: what dead writers left (``atomic_dir`` / ``atomic_write_bytes`` temporaries and backups), scratch
  downloads (``promote/``, ``dask/``) and what an interrupted gc left.

What stays: a resumable run (the newest run of its pipeline, FAILED or KILLED or left RUNNING by a dead
process, as ``flows.resume`` decides) and the caches it was made from; a live run; anything a process has
open; a run's metrics buffer (rows the store has not taken yet); lock files; logs, servers' state; ``mlruns/``.
While something is at work in the project (a build lock or training slot held, a live run, a process with
files open in the caches) stage caches and their temporaries are left alone: gc says so; run it again later.

Removal is crash-safe: an item is first renamed to a hidden sibling ``.gc-trash-…`` — one atomic rename, so it
is gone from its name whole — and only then deleted; a crash in between leaves that sibling, which the next gc
removes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from lm.atomic import LOCKS, locked

CATEGORIES = ("checkpoints", "caches", "temp")
WORK_DIR = Path(".lmp")
CONFIG = Path("pipelines.yaml")
TRASH_PREFIX = ".gc-trash-"
TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$")  # atomic_dir / atomic_write_bytes siblings
KEY_DIR = re.compile(r"^[0-9a-f]{16}$")  # a stage cache: the first 16 hex digits of its digest or key
INIT_DIR = re.compile(r"^(?P<name>.+)-v\d+$")  # init/<model>-v<version>: a downloaded initialising model
STAGE_ROOTS = ("data", "tokens", "labelled", "labelled-tokens", "init")
SCRATCH = ("promote", "dask")  # downloads and worker scratch that only a live command reads
SCRATCH_IDLE_S = 3600  # scratch written more recently may belong to a command still running
NEVER_WALKED = {"prefect", "postgres", "logs", LOCKS}  # the servers' databases under `lmp up`, server logs, locks
INTERRUPTED = ("FAILED", "KILLED")


@dataclass(frozen=True)
class GcItem:
    """One thing gc removes: a directory or file under the work directory, its size and why it may go."""

    path: Path
    category: str  # one of CATEGORIES
    bytes: int
    reason: str


@dataclass
class GcPlan:
    """What gc would remove (``items``) and what it kept that a user might expect gone, with why (``notes``)."""

    items: list[GcItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, path: Path, category: str, reason: str) -> None:
        if not any(i.path == path for i in self.items):
            self.items.append(GcItem(path, category, size_of(path), reason))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def total(self, category: str | None = None) -> int:
        return sum(i.bytes for i in self.items if category in (None, i.category))


# ---------------------------------------------------------------- sizes


def size_of(path: Path) -> int:
    """Bytes of the files at or under ``path`` (symbolic links counted as links, never followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                pass
    return total


def human(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- who is at work


def _held(lock: Path) -> bool:
    """Whether another open file holds an flock on ``lock`` (a lock file or directory); creates nothing."""
    try:
        fd = os.open(lock, os.O_RDONLY | (os.O_DIRECTORY if lock.is_dir() else 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases our probe's lock at once
    return False


def held_paths(root: Path) -> dict[Path, str]:
    """Paths under ``root`` that another process has open, mapped (token files are memory-mapped) or as its
    working directory → ``pid N (name)``. Processes that cannot be inspected (another user's) are skipped."""
    root, me, held = root.resolve(), os.getpid(), {}
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == me:
            continue
        found = []
        try:
            found.append(os.readlink(proc / "cwd"))
            for fd in (proc / "fd").iterdir():
                try:
                    found.append(os.readlink(fd))
                except OSError:
                    pass  # closed meanwhile
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    found.append(parts[5])
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        for text in found:
            path = Path(text.removesuffix(" (deleted)"))
            if path.is_relative_to(root):
                held[path] = f"pid {proc.name} ({name})"
    return held


def _slot_holder(lock: Path) -> str:
    """Who a held training slot's file says holds it (its pipeline and pid), else the file's name."""
    try:
        record = json.loads(lock.read_text())
        return f"{record['pipeline']} (pid {record['pid']})"
    except (OSError, ValueError, KeyError, TypeError):
        return lock.name


def _holder(path: Path, held: dict[Path, str]) -> str | None:
    path = path.resolve()
    return next((who for p, who in held.items() if p == path or p.is_relative_to(path)), None)


def _activity(work: Path, live: list[str], held: dict[Path, str]) -> list[str]:
    """What is at work on the stage caches now: held build locks and training slots, live runs, and processes
    with files open in the caches. Empty when caches and their temporaries may be collected."""
    from flows.ops import slots

    busy = list(live)
    for name in STAGE_ROOTS:
        root = work / name
        if not root.is_dir():
            continue
        locks = [root, *sorted((root / LOCKS).glob("*.lock"))]  # atomic_dir's swap, then build_once's keys
        if held_locks := [lock for lock in locks if _held(lock)]:
            busy.append(f"a stage is being built ({', '.join(_shown(p) for p in held_locks)} held)")
    slot_dir = slots.lock_dir()
    if held_slots := [_slot_holder(p) for p in sorted(slot_dir.glob("train-*.lock")) if _held(p)]:
        busy.append(f"a training slot is held by {', '.join(held_slots)} (slots in {slot_dir})")
    holders = sorted({who for p, who in held.items() if any(p.is_relative_to(work.resolve() / r) for r in STAGE_ROOTS)})
    if holders:
        busy.append(f"{', '.join(holders)} has files open in the stage caches")
    return busy


# ---------------------------------------------------------------- runs, from the tracking store


@dataclass(frozen=True)
class RunState:
    run_id: str
    pipeline: str
    experiment_id: str
    status: str
    start_time: int
    deleted: bool
    tags: dict


def _store(base_dir: Path):
    """An MlflowClient on the project's store, or None with why (no store yet: gc never creates one)."""
    from mlflow.tracking import MlflowClient

    from flows import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(base_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, f"there is no MLflow store at {uri}"
    return MlflowClient(uri, uri), uri


def _run_states(client, run_ids: list[str]) -> tuple[dict[str, RunState | None], dict[str, str | None]]:
    """Each run's state (None: the store has no such run), and each experiment's newest active run — the
    one ``find_resumable`` would look at."""
    from mlflow.exceptions import MlflowException

    states: dict[str, RunState | None] = {}
    names: dict[str, str] = {}
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            states[run_id] = None
            continue
        exp = run.info.experiment_id
        if exp not in names:
            names[exp] = client.get_experiment(exp).name
        states[run_id] = RunState(
            run_id, names[exp], exp, run.info.status, run.info.start_time or 0,
            run.info.lifecycle_stage == "deleted", dict(run.data.tags),
        )  # fmt: skip
    newest = {}
    for exp in names:
        top = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=1)
        newest[exp] = top[0].info.run_id if top else None
    return states, newest


def _live_elsewhere(client, known: Iterable[str]) -> list[str]:
    """Live runs of this store whose directories are not (yet) in the work directory."""
    from flows.resume import _gone

    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    running = client.search_runs(exps, filter_string="attributes.status = 'RUNNING'")
    return [
        f"run {r.info.run_id} ({r.data.tags.get('pipeline', r.info.experiment_id)}) is running"
        for r in running
        if r.info.run_id not in known and not _gone(r.data.tags)
    ]


def _plan_runs(plan: GcPlan, work: Path, client, keep_last: int) -> tuple[list[RunState], list[str], list[Path]]:
    """Plan the run directories; returns the runs whose caches must stay (resumable, live), descriptions of
    live runs, and the run directories whose temporaries may go (their process is gone)."""
    from flows.metric_sink import BUFFER_NAME
    from flows.resume import _gone

    runs = work / "runs"
    dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    states, newest = _run_states(client, [d.name for d in dirs])
    protected, live, dead_dirs, finished = [], [], [], {}
    unknown = [d for d in dirs if states[d.name] is None]
    if unknown:
        plan.note(
            f"kept {len(unknown)} run director{'y' if len(unknown) == 1 else 'ies'} the store does not know "
            f"({', '.join(_shown(d) for d in unknown[:3])}{'…' if len(unknown) > 3 else ''}): "
            "another MLFLOW_TRACKING_URI may own them (remove them by hand if that store is gone)"
        )
    for d in dirs:
        state = states[d.name]
        if state is None:
            continue
        if state.status == "RUNNING" and not _gone(state.tags):
            pid = state.tags.get("lmp.pid", "?")
            live.append(f"run {d.name} ({state.pipeline}) is running (pid {pid})")
            protected.append(state)
            continue
        dead_dirs.append(d)
        if state.deleted:
            _add_run(plan, d, BUFFER_NAME, f"run of {state.pipeline} deleted in MLflow")
        elif state.status in INTERRUPTED or state.status == "RUNNING":
            if newest.get(state.experiment_id) == d.name:
                plan.note(
                    f"kept {_shown(d)}: interrupted run of {state.pipeline} ({state.status.lower()}); "
                    f"`lmp run {state.pipeline}` resumes it"
                )
                protected.append(state)
            else:
                why = f"interrupted run of {state.pipeline} superseded by a newer run (only the newest resumes)"
                _add_run(plan, d, BUFFER_NAME, why)
        elif state.status == "FINISHED":
            finished.setdefault(state.pipeline, []).append((state, d))
        else:  # SCHEDULED or a status this code does not know: not ours to judge
            plan.note(f"kept {_shown(d)}: run status {state.status}")
    for pipeline, done in finished.items():
        done.sort(key=lambda pair: pair[0].start_time, reverse=True)
        for state, d in done[keep_last:]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.start_time / 1000))
            _add_run(
                plan, d, BUFFER_NAME, f"finished run of {pipeline} ({when}); newer finished runs kept: {keep_last}"
            )
    return protected, live, dead_dirs


def _add_run(plan: GcPlan, run_dir: Path, buffer_name: str, reason: str) -> None:
    """The run directory, whole — or, when it holds a metrics buffer, everything in it but the buffer."""
    buffer = run_dir / buffer_name
    if not buffer.exists():
        plan.add(run_dir, "checkpoints", reason)
        return
    plan.note(f"kept {_shown(buffer)}: a metrics buffer (rows the tracking store has not acknowledged)")
    for child in sorted(run_dir.iterdir()):
        if child.name != buffer_name:
            plan.add(child, "checkpoints", reason)


# ---------------------------------------------------------------- caches the current config uses


@dataclass
class Refs:
    """The stage caches to keep, by the folder of the work directory they live under (a task's ``data_root``
    and ``tokens_root``): prepared data by digest, index entries and encoded data by key, encoded data by the
    data it encodes where a task cannot tell its key before a run (a tokenizer that comes from the init model),
    and (data digest, tokenizer digest) pairs of resumable and live runs."""

    prepared: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    index: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    encoded: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    encoded_data: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    pairs: set[tuple[str, str]] = field(default_factory=set)
    init: set[str] = field(default_factory=set)  # registered-model names pipelines initialise from


def _indexed(root: Path, key: str) -> str | None:
    """The digest ``root/index/<key>.json`` records (None when that input was never built)."""
    try:
        return json.loads((root / "index" / f"{key}.json").read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _variants(spec) -> list:
    """The spec and the variants its runs use: the schedule's overrides and the sweep's trials."""
    out = [spec]
    if getattr(spec, "schedule", None) is not None:
        out.append(spec.scheduled())
    if getattr(spec, "sweep", None) is not None:
        out += [trial for _, trial in spec.trials()]
    return out


def _current_refs(config: Path, work: Path, base_dir: Path, plan: GcPlan) -> Refs | None:
    """What the pipelines in ``config`` would reuse now (None: the config cannot be read, so caches stay)."""
    from flows.config import INIT_URI, ConfigError, load_pipelines
    from lm import tasks
    from lm.plan import last_success

    try:
        pipelines = load_pipelines(config)
    except ConfigError as e:
        first = str(e).strip().splitlines()[0]
        plan.note(f"kept every stage cache: cannot tell which ones {config} uses ({first})")
        return None
    refs = Refs()
    for name, spec in pipelines.pipelines.items():
        for variant in _variants(spec):
            task = tasks.of(variant)
            if match := INIT_URI.match(task.init_from() or ""):
                refs.init.add(match["name"])
            try:
                key = task.ingest_key(base_dir)
                refs.index[task.data_root].add(key)
                if digest := _indexed(work / task.data_root, key):
                    refs.prepared[task.data_root].add(digest)
                    if tokens := task.tokens_key(digest):
                        refs.encoded[task.tokens_root].add(tokens)
                    else:
                        refs.encoded_data[task.tokens_root].add(digest)
            except (OSError, ValueError) as e:  # its data cannot be read now: keep what its last success used
                if record := last_success(work, name):
                    _last_refs(refs, record, task, work)
                    plan.note(f"kept the caches of {name}'s last successful run: its data cannot be read now ({e})")
    return refs


def _last_refs(refs: Refs, record: dict, task, work: Path) -> None:
    """The caches ``lm.plan.record_success`` recorded for a pipeline's last successful run."""
    from lm.cache import inputs_key

    ingest = inputs_key(record.get("ingest") or {})
    refs.index[task.data_root].add(ingest)
    if digest := _indexed(work / task.data_root, ingest):
        refs.prepared[task.data_root].add(digest)
    refs.encoded[task.tokens_root].add(inputs_key(record.get("tokenize") or {}))


def _manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _plan_caches(plan: GcPlan, work: Path, refs: Refs, protected: list[RunState]) -> None:
    """Stage caches no current config and no resumable or live run uses, and index entries left pointing
    at nothing — under every task's folders."""
    from lm import tasks

    roots = {(tasks.get(name).data_root, tasks.get(name).tokens_root) for name in tasks.TASKS}
    for state in protected:  # what the kept runs were made from (tags set once tokenize is done)
        if digest := state.tags.get("data_digest"):
            for data_root, _ in roots:
                refs.prepared[data_root].add(digest)
            refs.pairs.add((digest, state.tags.get("tokenizer_digest", "")))
    for data_root, tokens_root in sorted(roots):
        short = {d[:16] for d in refs.prepared[data_root]}
        _plan_stage(plan, work / data_root, lambda p, short=short: p.name in short, "prepared data")
        _plan_index(plan, work / data_root, refs.index[data_root])
        keys, by_data = {k[:16] for k in refs.encoded[tokens_root]}, refs.encoded_data[tokens_root]

        def used(p: Path, keys=keys, by_data=by_data) -> bool:
            manifest = _manifest(p)
            data = manifest.get("data_digest")
            return p.name in keys or data in by_data or (data, manifest.get("tokenizer_digest")) in refs.pairs

        _plan_stage(plan, work / tokens_root, used, "tokenized data")
    init = work / "init"
    for path in sorted(init.iterdir()) if init.is_dir() else []:
        match = INIT_DIR.match(path.name)
        if match and path.is_dir() and match["name"] not in refs.init:
            plan.add(path, "caches", "a downloaded model no pipeline initialises from (downloaded again if needed)")


def _plan_stage(plan: GcPlan, root: Path, used: Callable[[Path], bool], what: str) -> None:
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if KEY_DIR.match(path.name) and path.is_dir() and not path.is_symlink() and not used(path):
            plan.add(path, "caches", f"{what} that no pipeline's current config and no resumable run uses")


def _plan_index(plan: GcPlan, root: Path, keys: set[str]) -> None:
    """Index entries (input key → digest) of inputs no config has now, or whose cache is gone or going."""
    going = {i.path.name for i in plan.items if i.path.parent == root}
    for entry in sorted((root / "index").glob("*.json")):
        digest = _indexed(root, entry.stem) or ""
        if entry.stem not in keys and (digest[:16] in going or not (root / digest[:16]).is_dir()):
            plan.add(entry, "caches", "index entry of a removed cache")


# ---------------------------------------------------------------- temporaries


def _plan_temp(plan: GcPlan, work: Path, *, busy: bool, run_dirs: Iterable[Path], dead_dirs: list[Path]) -> None:
    """Temporaries dead writers left. Inside the directory of a run whose process is gone, always; elsewhere
    only when nothing is at work (a live writer's temporaries look the same)."""
    trash = [p for p in work.rglob(f"{TRASH_PREFIX}*") if not _under(p, work, NEVER_WALKED)]
    for path in trash:
        if not any(path.is_relative_to(other) and path != other for other in trash):
            plan.add(path, "temp", "left by an interrupted lmp gc")
    for run_dir in dead_dirs:
        for path in _temporaries(run_dir):
            plan.add(path, "temp", "a temporary a stopped writer left in its run directory")
    if busy:
        return
    skip = set(run_dirs)  # run directories: their own rules above (a live run's temporaries are its own)
    for parent, dirs, files in os.walk(work):
        parent_path = Path(parent)
        dirs[:] = [d for d in dirs if not (parent_path == work and d in NEVER_WALKED | {"runs"}) and d != LOCKS]
        for name in [*dirs, *files]:
            path = parent_path / name
            if TEMP_NAME.match(name) and path not in skip:
                plan.add(path, "temp", "a temporary a writer that died left (atomic write)")
        dirs[:] = [d for d in dirs if not TEMP_NAME.match(d) and not d.startswith(TRASH_PREFIX)]
    for name in SCRATCH:  # a live `lmp promote` leaves no other trace than fresh files here
        scratch = work / name
        if scratch.exists() and time.time() - _last_modified(scratch) < SCRATCH_IDLE_S:
            plan.note(f"kept {_shown(scratch)}: written in the last {SCRATCH_IDLE_S // 60} minutes")
        elif scratch.exists():
            plan.add(scratch, "temp", f"scratch space of `lmp {'promote' if name == 'promote' else 'sweep'}`")


def _last_modified(path: Path) -> float:
    """The newest modification time at or under ``path``."""
    newest = path.lstat().st_mtime
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except OSError:
                pass
    return newest


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in sorted(run_dir.rglob(".*")) if TEMP_NAME.match(p.name)]


def _under(path: Path, work: Path, names: set[str]) -> bool:
    rel = path.relative_to(work).parts
    return bool(rel) and rel[0] in names


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- plan and run


def plan_gc(workdir: Path = WORK_DIR, *, config: Path, base_dir: Path, keep_last: int = 1) -> GcPlan:
    """What gc would remove from ``workdir`` (nothing is changed), keeping the newest ``keep_last`` finished
    runs of each pipeline; ``config`` is the pipelines file whose caches stay, ``base_dir`` the project."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be 0 or more, not {keep_last}")
    plan, work = GcPlan(), Path(workdir)
    if not work.is_dir():
        return plan
    import flows.metric_sink  # noqa: F401 — imported here so that a broken import is not taken for a broken store
    import flows.resume  # noqa: F401

    held = held_paths(work)
    protected, live, run_dirs, dead_dirs = [], [], [], []
    runs = work / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        run_dirs = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
        client, where = _store(Path(base_dir))
        try:
            if client is None:
                raise RuntimeError(where)
            protected, live, dead_dirs = _plan_runs(plan, work, client, keep_last)
            live += _live_elsewhere(client, [p.name for p in run_dirs])
        except Exception as e:  # noqa: BLE001 — an unreadable store: no run is judged, every run stays
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            plan.note(f"kept every run directory: cannot read their state from the MLflow store ({first})")
            plan.items.clear()
            live.append("the state of runs is unknown")
    elif (client := _store(Path(base_dir))[0]) is not None:
        try:
            live = _live_elsewhere(client, [])
        except Exception:  # noqa: BLE001 — no runs here to judge; only the busy check loses this source
            pass
    busy = _activity(work, live, held)
    if busy:
        plan.note(f"left stage caches and their temporaries alone: {'; '.join(busy)}; run gc again later")
    elif (refs := _current_refs(Path(config), work, Path(base_dir), plan)) is not None:
        _plan_caches(plan, work, refs, protected)
    _plan_temp(plan, work, busy=bool(busy), run_dirs=run_dirs, dead_dirs=dead_dirs)
    going = [i.path for i in plan.items]
    plan.items = [i for i in plan.items if not any(i.path.is_relative_to(p) and i.path != p for p in going)]
    for item in list(plan.items):  # last word: a process holding anything in an item keeps it
        if who := _holder(item.path, held):
            plan.items.remove(item)
            plan.note(f"kept {_shown(item.path)}: {who} has it open")
    return plan


def run_gc(plan: GcPlan) -> dict[str, int]:
    """Remove the plan's items, each renamed away (atomically) before it is deleted; bytes freed by category."""
    freed = dict.fromkeys(CATEGORIES, 0)
    for item in plan.items:
        if remove(item.path):
            freed[item.category] += item.bytes
    return freed


def remove(path: Path) -> bool:
    """Rename ``path`` to a hidden ``.gc-trash-…`` sibling (a reader sees it whole or not at all), then delete
    it. False when it was already gone."""
    path = Path(path)
    if path.name.startswith(TRASH_PREFIX):
        trash = path
    else:
        trash = path.with_name(f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOENT,):
                raise
            return False
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash)
    else:
        trash.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- the command


def gc(
    keep_last: Annotated[
        int, typer.Option("--keep-last", min=0, help="Finished runs per pipeline whose checkpoints stay.")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would go and its size; remove nothing.")
    ] = False,
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipelines file whose stage caches stay.")] = CONFIG,
) -> None:
    """Free disk space in .lmp: checkpoints of finished runs (the newest --keep-last per pipeline stay),
    stage caches the current config does not use, and temporaries dead writers left. Resumable and running
    runs, and anything in use, are never touched; neither are registered models (mlruns/)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)
    work = WORK_DIR
    # A tracking server that is down: give up in seconds (the runs are then kept), not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not work.is_dir():
        console.print(f"nothing to remove: there is no work directory {work} here (lmp run creates it)")
        return
    base = Path.cwd()
    if dry_run:
        plan = plan_gc(work, config=config, base_dir=base, keep_last=keep_last)
        freed = {c: plan.total(c) for c in CATEGORIES}
    else:
        with locked(work / LOCKS / "gc.lock"):  # two gcs at once would judge each other's trash
            plan = plan_gc(work, config=config, base_dir=base, keep_last=keep_last)
            freed = run_gc(plan)
    if not plan.items:
        console.print(f"nothing to remove in {work}")
    else:
        verb = "would remove" if dry_run else "removed"
        console.print(f"{'dry run: ' if dry_run else ''}{verb} {len(plan.items)} item(s):")
        width = max(len(c) for c in CATEGORIES)
        for item in sorted(plan.items, key=lambda i: (CATEGORIES.index(i.category), str(i.path))):
            line = f"  {item.category:<{width}}  {human(item.bytes):>10}  {_shown(item.path)}: {item.reason}"
            console.print(escape(line))
        console.print(f"space {'it would free' if dry_run else 'freed'}:")
        for category in CATEGORIES:
            count = sum(1 for i in plan.items if i.category == category)
            console.print(f"  {category:<{width}}  {human(freed[category]):>10}  ({count} item(s))")
        console.print(f"  {'total':<{width}}  {human(sum(freed.values())):>10}")
        if dry_run:
            console.print("dry run: nothing was removed; `lmp gc` without --dry-run frees it")
    for note in plan.notes:
        console.print(escape(note))
