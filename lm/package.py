"""The one package of a trained model — ``model.safetensors``, ``config.json``, ``tokenizer.json`` — as every
task exports it and as the served pyfunc, `lmp generate`, the champion gate and ``init_from`` load it.

``config.json`` holds the architecture (``model``), ``vocab_size`` and what the task adds (a classifier's
``task``, ``head``, ``labels`` …); a language model's has no ``task`` key, so packages from before tasks had a
name still load. Which task builds the model is read from the config through ``lm.tasks`` — the one map of
task names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lm.atomic import atomic_write_bytes
from lm.checkpoint import load_weights
from lm.errors import DataError
from lm.results import Package
from lm.tokenizers import Tokenizer, load_tokenizer

FILES = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
LANGUAGE_MODEL = "language-model"


def export(out_dir: Path, *, weights: Path, tokenizer: Path, config: dict) -> Package:
    """Write ``config.json`` into ``out_dir`` (atomically) beside the given weights and tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / FILES["config"], json.dumps(config, indent=2).encode())
    return Package(weights=str(weights), config=str(out_dir / FILES["config"]), tokenizer=str(tokenizer))


def find(where: Path) -> Package | None:
    """The package files anywhere under ``where`` (a downloaded model version), None if one is missing."""
    found = {key: next(Path(where).rglob(name), None) for key, name in FILES.items()}
    return None if None in found.values() else Package(**{k: str(v) for k, v in found.items()})


def read_config(package: Package) -> dict:
    return json.loads(Path(package.config).read_text(encoding="utf-8"))


def task_name(config: dict) -> str:
    """The task a package was exported by."""
    return config.get("task", LANGUAGE_MODEL)


def check_vocabulary(tokenizer: Tokenizer, config: dict) -> None:
    """A package's tokenizer and model must agree on the ids (files mixed from different runs do not)."""
    if tokenizer.vocab_size != config["vocab_size"]:
        raise DataError(
            f"tokenizer.json has {tokenizer.vocab_size} ids but the model was built for {config['vocab_size']}: "
            "the package mixes files from different runs"
        )


@dataclass(frozen=True)
class Loaded:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict


def load(package: Package) -> Loaded:
    """The package's model (in eval mode, weights verified strict) and tokenizer, with its config."""
    from lm import tasks

    config = read_config(package)
    tokenizer = load_tokenizer(Path(package.tokenizer))
    check_vocabulary(tokenizer, config)
    model = tasks.get(task_name(config)).build_packaged(config)
    return Loaded(load_weights(Path(package.weights), model).eval(), tokenizer, config)
