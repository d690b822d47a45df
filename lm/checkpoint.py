"""Atomic checkpoint save and verified load: safetensors weights + JSON state, never pickle.

A checkpoint directory holds ``model.safetensors``, ``state.json`` and ``MANIFEST.json`` (sha256 of
each file, written last). It is assembled in a temporary directory and renamed into place, so a
reader sees either the whole checkpoint or none of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lm.atomic import atomic_dir

WEIGHTS = "model.safetensors"
STATE = "state.json"
TENSORS = "train_state.safetensors"  # optimizer moments, RNG states: plain tensors, never pickle
MANIFEST = "MANIFEST.json"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    path: Path, model: nn.Module, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write weights, the JSON ``state`` and optional extra ``tensors`` to ``path`` atomically.

    The manifest (sha256 of every file) is written last, inside the temporary directory, which is
    then renamed into place: a reader sees a whole checkpoint or none.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_model(model, str(tmp / WEIGHTS))  # handles tied (shared) tensors
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        names = [WEIGHTS, STATE]
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
            names.append(TENSORS)
        files = {name: sha256_file(tmp / name) for name in names}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The extra tensors of a verified checkpoint (empty when it has none)."""
    file = Path(path) / TENSORS
    return load_file(str(file)) if file.exists() else {}


def step_checkpoints(root: Path) -> list[Path]:
    """``root/step-NNNNNNNN`` directories, newest first (temporary directories are ignored)."""
    return sorted((p for p in Path(root).glob(f"{STEP_PREFIX}*") if p.is_dir()), reverse=True)


def latest_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint whose manifest verifies, and the reasons newer ones were rejected."""
    rejected = []
    for path in step_checkpoints(root):
        try:
            verify_checkpoint(path)
            return path, rejected
        except CheckpointError as e:
            rejected.append(str(e))
    return None, rejected


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints, and temporary directories a killed writer left."""
    for old in step_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(f".{STEP_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the state. Raises CheckpointError with the reason."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({e})") from e
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {MANIFEST}")
        if name.endswith(".safetensors") and not is_safetensors(file):
            raise CheckpointError(f"{path}: {name} is not a safetensors file (refused unread)")
    return json.loads((path / STATE).read_text())


def is_safetensors(file: Path) -> bool:
    """Whether ``file`` starts like a safetensors file: a little-endian length, then that many bytes of JSON
    object header. Anything else — a pickle dressed up with a matching manifest — is never handed to a loader."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return False
        size = int.from_bytes(head, "little")
        if not 2 <= size <= min(Path(file).stat().st_size - 8, 100 << 20):
            return False
        try:
            return isinstance(json.loads(f.read(size)), dict)
        except ValueError:
            return False


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Verify ``path``, load its weights into ``model`` (strict) and return its state."""
    state = verify_checkpoint(path)
    load_model(model, str(Path(path) / WEIGHTS), strict=True)
    return state


def load_weights(path: Path, model: nn.Module) -> nn.Module:
    """Load a bare safetensors file into ``model`` (strict: every tensor must match)."""
    load_model(model, str(path), strict=True)
    return model
