"""The task map and what every task implements."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from lm import tasks
from lm.metrics import METRICS
from lm.tasks.base import Task

ROOT = Path(__file__).resolve().parents[2]


def test_every_registered_task_implements_every_method_of_the_protocol():
    wanted = {name for name in vars(Task) if not name.startswith("_")} - {
        "name",
        "data_root",
        "tokens_root",
        "summary_metrics",
    }
    for name in tasks.TASKS:
        cls = tasks.get(name)
        assert cls.name == name
        assert set(cls.summary_metrics) <= set(METRICS), f"{name}: summary metrics missing from lm.metrics"
        missing = {m for m in wanted if not hasattr(cls, m)}
        assert not missing, f"{name} lacks {sorted(missing)}"


def test_tasks_keep_their_data_apart():
    roots = [(tasks.get(n).data_root, tasks.get(n).tokens_root) for n in tasks.TASKS]
    flat = [r for pair in roots for r in pair]
    assert len(flat) == len(set(flat))


def test_an_unknown_task_names_the_tasks_there_are():
    with pytest.raises(ValueError, match="unknown task 'translation'; the tasks are language-model, classification"):
        tasks.get("translation")


def test_the_map_imports_no_task_module_until_asked():
    """Reading pipelines.yaml (flows/config.py) must not import torch through the task map."""
    source = (ROOT / "lm" / "tasks" / "__init__.py").read_text()
    assert "import torch" not in source and "from lm.tasks." not in source
    importlib.import_module("lm.tasks")


def test_nothing_outside_the_map_asks_which_task_it_is():
    """The one place a task name maps to its implementation is lm/tasks/__init__.py."""
    offenders = []
    for folder in ("flows", "lm"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "task ==" in text or ".task ==" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_training_loop_imports_nothing_of_classification():
    tree = ast.parse((ROOT / "lm" / "training.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("lm.classification", "lm.tasks"))}
