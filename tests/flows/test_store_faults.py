"""A damaged or read-only embedded store (``mlruns/``): one clear message and an exit status from every
command, never a traceback (unless ``--verbose``); read commands still work on a read-only store.

Real ``lmp`` processes. A read-only store is chmod'ed read-only; as root, which ignores permission bits, it
is marked immutable (``chattr +i``) instead, which refuses writes the same way (EPERM instead of EACCES)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m ""` (CI) runs it, plain `pytest` does not

ROOT = Path(__file__).resolve().parents[2]
LMP = str(Path(sys.executable).with_name("lmp"))


@pytest.fixture(scope="module")
def initialised_db(tmp_path_factory) -> Path:
    """An MLflow store with its schema, made once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def _project(path: Path, db: Path) -> Path:
    (path / "mlruns").mkdir(parents=True)
    shutil.copy(ROOT / "pipelines.yaml", path / "pipelines.yaml")
    shutil.copy(db, path / "mlruns" / "mlflow.db")
    return path


def _env(path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    home = path / "home"
    home.mkdir(exist_ok=True)
    return env | {"HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / "cache")}


def _start(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [LMP, *args], cwd=path, env=_env(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _one_clear_error(err: str) -> str:
    """The one ``error:`` line (anything else on stderr is at most MLflow's own INFO lines)."""
    assert "Traceback" not in err and 'File "' not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_truncated_store_gives_one_clear_message_and_exit_2_from_every_command(tmp_path, initialised_db):
    project = _project(tmp_path / "project", initialised_db)
    db = project / "mlruns" / "mlflow.db"
    with open(db, "r+b") as f:  # a copy cut short (disk full, a killed copy): the schema pages are gone
        f.truncate(db.stat().st_size // 3)
    commands = {
        "models": _start(project, "models"),
        "compare": _start(project, "compare"),
        "run": _start(project, "run", "smoke"),
        "verbose": _start(project, "--verbose", "models"),
    }
    results = {name: _finish(proc) for name, proc in commands.items()}
    for name in ("models", "compare", "run"):
        code, out, err = results[name]
        assert code == 2, (name, out, err)
        line = _one_clear_error(err)
        assert "mlruns/mlflow.db" in line and "not a readable SQLite database" in line, line
        assert "restore it from a backup" in line, line
    code, _, err = results["verbose"]
    assert code == 2 and "Traceback" in err  # --verbose shows where it came from
    assert db.stat().st_size == initialised_db.stat().st_size // 3  # nothing tried to "repair" it


def _make_read_only(mlruns: Path) -> list[str] | None:
    """Make ``mlruns/`` and its database read-only for this user; returns the command that undoes it.
    Root ignores permission bits, so as root the two are marked immutable (``chattr +i``), which refuses
    root's writes the way a read-only directory refuses a user's."""
    paths = [str(mlruns / "mlflow.db"), str(mlruns)]
    if os.geteuid() != 0:
        for path in paths:
            Path(path).chmod(stat.S_IMODE(Path(path).stat().st_mode) & ~0o222)
        return ["chmod", "-R", "u+w", str(mlruns)]
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *paths]).returncode != 0:
        pytest.skip("running as root where chattr +i is unavailable: cannot make a store read-only for root")
    return ["chattr", "-i", *paths]


def test_read_only_store_reads_work_and_a_run_fails_with_one_clear_message(tmp_path, initialised_db):
    project = _project(tmp_path / "project", initialised_db)
    mlruns = project / "mlruns"
    undo = _make_read_only(mlruns)
    try:
        assert not os.access(mlruns, os.W_OK)
        before = sorted(p.name for p in mlruns.iterdir())
        commands = {"models": _start(project, "models"), "compare": _start(project, "compare"),
                    "run": _start(project, "run", "smoke")}  # fmt: skip
        results = {name: _finish(proc) for name, proc in commands.items()}
        for name in ("models", "compare"):
            code, out, err = results[name]
            assert code == 0, (name, out, err)
            assert "Traceback" not in err and "error" not in err, err
        assert "registered models" in results["models"][1]
        code, out, err = results["run"]
        assert code == 1, (out, err)
        line = _one_clear_error(err)
        assert str(mlruns) in line and "read-only" in line, line
        assert sorted(p.name for p in mlruns.iterdir()) == before  # nothing written there
    finally:
        subprocess.run(undo, check=True)
