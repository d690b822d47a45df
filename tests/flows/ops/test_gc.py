"""`lmp gc`: what it removes (old checkpoints, orphan caches, dead writers' temp dirs), what it never touches
(a resumable run, a live run, the current config's caches, anything held), its dry run, and its output.

Layouts are built with the real stage functions and checkpoints, and runs in a real embedded MLflow store;
nothing is trained.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from lm import stages
from lm.atomic import LOCKS, atomic_write_bytes, locked
from lm.checkpoint import save_checkpoint
from lm.config import CharTokenizerConfig, FilesData

CONTEXT = 8
PIPELINES = """\
default: p
pipelines:
  p:
    description: gc test pipeline
    data: {source: files, paths: [corpus]%s}
    tokenizer: {kind: char}
    model: {kind: gpt, num_layers: 1, num_heads: 1, embed_dim: 8, context_length: 8}
    train: {max_steps: 2, batch_size: 2, precision: fp32, device: cpu}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory (cwd) with a pipelines.yaml, its data, an embedded store and its own slot locks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"f{i}.txt").write_text(f"file {i}: " + "the quick brown fox jumps. " * 40)
    (tmp_path / "pipelines.yaml").write_text(PIPELINES % "")
    return tmp_path


@pytest.fixture
def client(project):
    """An MLflow client on the project's embedded store (created here, as `lmp run` would)."""
    from mlflow.tracking import MlflowClient

    from flows import tracking

    uri = tracking.configure(project)
    return MlflowClient(uri, uri)


def build_caches(root: Path, max_chars: int | None = None) -> tuple[dict, dict]:
    """Ingest and tokenize the project's corpus into ``root/.lmp`` (``max_chars``: another config)."""
    cfg = FilesData(source="files", paths=("corpus",), max_chars=max_chars)
    work = root / ".lmp"
    corpus = stages.ingest(cfg, work / "data", base_dir=root, context_length=CONTEXT)
    tokens = stages.tokenize(corpus, CharTokenizerConfig(), work / "tokens", context_length=CONTEXT)
    return corpus, tokens


def make_run(client, root: Path, status: str, start: int, *, steps=(10, 20), final=False, tags=None) -> str:
    """A run of pipeline ``p`` in MLflow with ``status``, and its directory with step checkpoints (and final/)."""
    exp = client.get_experiment_by_name("p")
    exp_id = exp.experiment_id if exp else client.create_experiment("p")
    run = client.create_run(exp_id, start_time=start, tags=tags or {})
    run_id = run.info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    out = root / ".lmp" / "runs" / run_id
    model = torch.nn.Linear(16, 16)
    for step in steps:
        save_checkpoint(out / f"step-{step:08d}", model, {"step": step})
    if final:
        save_checkpoint(out / "final", model, {"step": max(steps, default=0)})
    return run_id


def gc_app() -> typer.Typer:
    """A tiny app that registers the gc command as flows/cli/commands.py does."""
    from flows.ops import gc

    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps `gc` a subcommand, as in `lmp`
        pass

    app.command()(gc.gc)
    return app


def invoke(*args: str):
    result = CliRunner().invoke(gc_app(), ["gc", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def paths(plan) -> dict[Path, str]:
    return {item.path.resolve(): item.category for item in plan.items}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_gc_module_plans_and_runs(project, client):
    """The fail-first check: flows/ops/gc.py exists and plans a finished run's checkpoints for removal."""
    from flows.ops.gc import plan_gc, run_gc

    old = make_run(client, project, "FINISHED", 1_000, final=True)
    make_run(client, project, "FINISHED", 2_000, final=True)
    (project / ".lmp" / "runs" / old / ".step-00000030.tmp-abcd1234").mkdir()  # inside: counted once
    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    assert paths(plan) == {(project / ".lmp" / "runs" / old).resolve(): "checkpoints"}
    freed = run_gc(plan)
    assert freed["checkpoints"] == plan.items[0].bytes > 0
    assert not (project / ".lmp" / "runs" / old).exists()


def test_dry_run_deletes_nothing_and_reports_sizes(project, client):
    from flows.ops.gc import human, plan_gc

    build_caches(project, max_chars=600)  # an earlier config's caches: orphans now
    build_caches(project)
    for start in (1_000, 2_000, 3_000):
        make_run(client, project, "FINISHED", start, final=True)
    before = {p: p.stat().st_mtime_ns for p in (project / ".lmp").rglob("*")}
    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    assert {item.category for item in plan.items} == {"checkpoints", "caches"}

    result = invoke("--dry-run")
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in (project / ".lmp").rglob("*")} == before  # nothing touched
    out = " ".join(result.output.split())
    assert "dry run" in out and "would free" in out
    for category in ("checkpoints", "caches"):
        size = sum(i.bytes for i in plan.items if i.category == category)
        assert f"{category} {human(size)}" in out
    assert f"total {human(sum(i.bytes for i in plan.items))}" in out
    for item in plan.items:
        assert item.path.name in out  # each item is listed


def test_resumable_and_live_runs_are_kept(project, client):
    """The newest run KILLED: `lmp run` resumes it, so its checkpoints stay, as do the caches it was made
    from; a RUNNING run whose process lives is left alone; an older interrupted run is superseded."""
    from flows.ops.gc import plan_gc
    from flows.resume import HOST_TAG, PID_TAG, process_tags

    old_corpus, old_tokens = build_caches(project, max_chars=600)  # the resumable run was made from these
    build_caches(project)
    superseded = make_run(client, project, "FAILED", 1_000)
    finished = make_run(client, project, "FINISHED", 2_000, final=True)
    resumable = make_run(
        client,
        project,
        "KILLED",
        3_000,
        tags={"data_digest": old_corpus.digest, "tokenizer_digest": old_tokens.tokenizer_digest},
    )
    live = make_run(client, project, "RUNNING", 500, tags=process_tags())  # this test's own process: alive
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed_tags = {PID_TAG: dead_pid.stdout.strip(), HOST_TAG: process_tags()[HOST_TAG]}
    crashed = make_run(client, project, "RUNNING", 400, tags=crashed_tags)  # left RUNNING by a dead process
    runs = project / ".lmp" / "runs"

    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=0)
    planned = paths(plan)
    assert planned[(runs / superseded).resolve()] == "checkpoints"
    assert planned[(runs / finished).resolve()] == "checkpoints"
    assert planned[(runs / crashed).resolve()] == "checkpoints"  # dead and not the newest run: never resumed
    kept = [runs / resumable, runs / live, Path(old_corpus.path), Path(old_tokens.path)]
    for path in kept:
        assert not any(p == path.resolve() or path.resolve().is_relative_to(p) for p in planned), path
        assert not any(p.is_relative_to(path.resolve()) for p in planned), path
    notes = " ".join(plan.notes)
    assert resumable in notes and "resum" in notes and live in notes

    from flows.ops.gc import run_gc

    run_gc(plan)
    assert sorted(p.name for p in runs.iterdir()) == sorted([resumable, live])
    assert len(list((runs / resumable).glob("step-*"))) == 2

    # Once nothing runs, caches are judged: those the resumable run was made from stay (its tags name them).
    client.set_terminated(live, "KILLED")
    planned = paths(plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=0))
    assert planned == {(runs / live).resolve(): "checkpoints"}  # superseded by the resumable run


def test_keep_last(project, client):
    runs = [make_run(client, project, "FINISHED", start, final=True) for start in (1_000, 2_000, 3_000, 4_000)]
    root = project / ".lmp" / "runs"

    result = invoke("--keep-last", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in root.iterdir()) == sorted(runs[2:])  # the two newest finished runs stay

    assert invoke().exit_code == 0  # the default keeps the newest one
    assert [p.name for p in root.iterdir()] == [runs[3]]

    result = invoke("--keep-last", "0")
    assert result.exit_code == 0 and not list(root.iterdir())
    assert invoke("--keep-last", "-1").exit_code == 2  # refused, not "keep everything but one"


def test_current_config_caches_kept_orphans_removed(project, client):
    from flows.ops.gc import plan_gc, run_gc

    orphan_corpus, orphan_tokens = build_caches(project, max_chars=600)
    corpus, tokens = build_caches(project)
    work = project / ".lmp"
    plan = plan_gc(work, config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    planned = paths(plan)
    assert planned[Path(orphan_corpus.path).resolve()] == "caches"
    assert planned[Path(orphan_tokens.path).resolve()] == "caches"
    assert planned[(work / "data" / "index" / f"{orphan_corpus.key}.json").resolve()] == "caches"
    assert Path(corpus.path).resolve() not in planned and Path(tokens.path).resolve() not in planned
    run_gc(plan)

    # The current config still finds both caches: the next run skips ingest and tokenize.
    from lm.plan import plan as stage_plan

    cfg = FilesData(source="files", paths=("corpus",))
    statuses = {s.stage: s.status for s in stage_plan("p", cfg, CharTokenizerConfig(), workdir=work, base_dir=project)}
    assert statuses["ingest"] == statuses["tokenize"] == "cached"
    assert not Path(orphan_corpus.path).exists() and not Path(orphan_tokens.path).exists()
    assert list((work / "data" / LOCKS).iterdir())  # lock files are never removed

    # The config now names the other data: its caches stay and the former ones go.
    (project / "pipelines.yaml").write_text(PIPELINES % ", max_chars: 600")
    planned = paths(plan_gc(work, config=project / "pipelines.yaml", base_dir=project, keep_last=1))
    assert Path(corpus.path).resolve() in planned and Path(tokens.path).resolve() in planned


def test_unreadable_config_keeps_every_cache(project, client):
    from flows.ops.gc import plan_gc

    build_caches(project, max_chars=600)
    build_caches(project)
    (project / "pipelines.yaml").write_text("pipelines: [")
    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    assert not [i for i in plan.items if i.category == "caches"]
    assert any("pipelines.yaml" in note for note in plan.notes)


def test_orphan_temp_dirs_removed_unless_a_writer_holds_them(project, client):
    from flows.ops.gc import plan_gc, run_gc

    build_caches(project)
    work = project / ".lmp"
    # What a killed writer leaves: atomic_dir's temporary and backup siblings, atomic_write_bytes' temp file.
    tmp_dir = work / "tokens" / ".0123456789abcdef.tmp-k1ll3d00"
    tmp_dir.mkdir()
    (tmp_dir / "train.bin").write_bytes(b"\0" * 4096)
    old_dir = work / "data" / ".0123456789abcdef.old-abcd1234"
    old_dir.mkdir()
    tmp_file = work / "last" / ".p.json.tmp-zz9abcde"
    tmp_file.parent.mkdir()
    tmp_file.write_bytes(b"{")
    resumable = make_run(client, project, "KILLED", 1_000)
    ckpt_tmp = work / "runs" / resumable / ".step-00000030.tmp-dead0000"
    ckpt_tmp.mkdir()
    config = project / "pipelines.yaml"

    # A stage being built (its build_once lock held): the stage roots' temp dirs may be its own; left alone.
    with locked(work / "tokens" / LOCKS / f"{'f' * 64}.lock"):
        busy = plan_gc(work, config=config, base_dir=project, keep_last=1)
    assert tmp_dir.resolve() not in paths(busy) and old_dir.resolve() not in paths(busy)
    assert ckpt_tmp.resolve() in paths(busy)  # inside a dead run: nobody writes there
    assert any("being built" in note for note in busy.notes)

    plan = plan_gc(work, config=config, base_dir=project, keep_last=1)
    planned = paths(plan)
    for path in (tmp_dir, old_dir, tmp_file, ckpt_tmp):
        assert planned[path.resolve()] == "temp"
    run_gc(plan)
    assert not any(p.exists() for p in (tmp_dir, old_dir, tmp_file, ckpt_tmp))
    assert (work / "runs" / resumable / "step-00000020").is_dir()


def test_nothing_a_process_holds_open_is_removed(project, client):
    from flows.ops.gc import plan_gc

    orphan, _ = build_caches(project, max_chars=600)
    build_caches(project)
    held = Path(orphan.path) / "train.txt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1]); print('open', flush=True); sys.stdin.read()", held],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    finally:
        holder.communicate("")  # closes its stdin: it exits
    assert not [i for i in plan.items if i.category == "caches"]  # a process works in the caches: none go
    assert any(str(holder.pid) in note for note in plan.notes)


def test_an_interrupted_gc_leaves_no_valid_looking_cache(project, client, monkeypatch):
    """Each item is renamed away in one step before it is removed: a crash mid-removal leaves a hidden trash
    directory (collected next time), never a half-deleted cache that a run would take as valid."""
    import shutil

    from flows.ops import gc
    from lm import data

    orphan, _ = build_caches(project, max_chars=600)
    build_caches(project)
    work = project / ".lmp"
    plan = gc.plan_gc(work, config=project / "pipelines.yaml", base_dir=project, keep_last=1)

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # the machine going down mid-rmtree

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        gc.run_gc(plan)
    monkeypatch.undo()
    assert data.cached_corpus(work / "data", orphan.key) is None  # gone from its name, whole
    leftovers = [p for p in work.rglob(f"{gc.TRASH_PREFIX}*") if p.parent.name in ("data", "tokens")]
    assert leftovers
    again = gc.plan_gc(work, config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    assert {p.resolve() for p in leftovers} <= set(paths(again))
    gc.run_gc(again)
    assert not list(work.rglob(f"{gc.TRASH_PREFIX}*"))


def test_metrics_buffer_is_never_removed(project, client):
    from flows.metric_sink import BUFFER_NAME
    from flows.ops.gc import plan_gc, run_gc

    old = make_run(client, project, "FINISHED", 1_000, final=True)
    make_run(client, project, "FINISHED", 2_000, final=True)
    buffer = project / ".lmp" / "runs" / old / BUFFER_NAME
    atomic_write_bytes(buffer, b'{"key": "train_loss", "value": 1.0, "step": 3}\n')
    run_gc(plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1))
    assert buffer.read_bytes().startswith(b'{"key"')
    assert not list((project / ".lmp" / "runs" / old).glob("step-*")) and not (buffer.parent / "final").exists()


def test_empty_or_missing_work_dir(project):
    started = time.perf_counter()
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "nothing to remove" in result.output and ".lmp" in result.output
    assert not (project / ".lmp").exists() and not (project / "mlruns").exists()  # creates nothing

    (project / ".lmp").mkdir()
    result = invoke("--dry-run")
    assert result.exit_code == 0 and "nothing to remove" in result.output
    assert tree(project / ".lmp") == set()
    assert time.perf_counter() - started < 10
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 8
    assert os.listdir(project / ".lmp") == []


def test_a_held_training_slot_leaves_caches_alone(project, client):
    """A training slot held (by any process of this user): something trains, caches may be in use."""
    from flows.ops import slots
    from flows.ops.gc import plan_gc

    build_caches(project, max_chars=600)
    build_caches(project)
    with slots.training_slot(1):
        plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project, keep_last=1)
    assert not [i for i in plan.items if i.category == "caches"]
    assert any("training slot" in note for note in plan.notes)
    assert [i for i in plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project).items
            if i.category == "caches"]  # fmt: skip


def test_scratch_downloads_go_once_idle(project, client):
    from flows.ops.gc import SCRATCH_IDLE_S, plan_gc

    scratch = project / ".lmp" / "promote" / "champion-v3"
    scratch.mkdir(parents=True)
    (scratch / "model.safetensors").write_bytes(b"\0" * 1000)
    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project)
    assert not plan.items and any("promote" in note for note in plan.notes)  # maybe a live `lmp promote`'s
    old = time.time() - SCRATCH_IDLE_S - 60
    for path in (scratch / "model.safetensors", scratch, scratch.parent):
        os.utime(path, (old, old))
    plan = plan_gc(project / ".lmp", config=project / "pipelines.yaml", base_dir=project)
    assert [(i.path.name, i.category, i.bytes) for i in plan.items] == [("promote", "temp", 1000)]
