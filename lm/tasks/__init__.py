"""Tasks: what a pipeline trains a model to do. ``TASKS`` is the one place a task's name (``task:`` in
pipelines.yaml, ``task`` in a package's config.json) maps to its implementation of ``lm.tasks.base.Task``;
nothing else asks which task it is. Modules are imported on first use, so reading pipelines.yaml imports no
torch.

A new task: one module here implementing ``Task``, its spec in ``flows/config.py`` and one line below.
"""

from __future__ import annotations

import importlib

TASKS = {
    "language-model": "lm.tasks.language_model:LanguageModel",
    "classification": "lm.tasks.classification:Classification",
    "seq2seq": "lm.tasks.seq2seq:Seq2SeqTask",
}


def get(name: str) -> type:
    """The Task class registered under ``name``."""
    try:
        module, _, attribute = TASKS[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}") from None
    return getattr(importlib.import_module(module), attribute)


def of(spec):
    """The task object of a pipeline spec."""
    return get(spec.task)(spec)
