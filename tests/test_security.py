"""Security promises that hold for the whole source tree (RELIABILITY.md 18 and 20) and a checkpoint gadget."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from lm.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from lm.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PICKLERS = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def offences(source: str) -> list[str]:
    """Pickling modules, torch.load, unsafe YAML loaders, os.system/popen, shell=True, string commands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLERS:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            owner = getattr(func.value, "id", None) if isinstance(func, ast.Attribute) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if owner == "torch" and name == "load":
                found.append("torch.load")
            if owner == "yaml" and name in UNSAFE_YAML:
                found.append(f"yaml.{name}")
            if owner == "os" and name in {"system", "popen"}:
                found.append(f"os.{name}")
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append("shell=")
            if owner == "subprocess" and node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr):
                found.append(f"subprocess.{name} with a command string")
    return found


def test_no_pickle_shell_or_unsafe_yaml_anywhere_in_the_code():
    files = [f for folder in ("lm", "flows", "bench") for f in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 40
    hits = {str(f.relative_to(ROOT)): offences(f.read_text()) for f in files}
    assert {k: v for k, v in hits.items() if v} == {}


@pytest.mark.parametrize(
    "line",
    [
        "import pickle",
        "from cloudpickle import dumps",
        "torch.load(path)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.full_load(text)",
        "os.system('ls')",
        "subprocess.run(cmd, shell=True)",
        "subprocess.run('ls -l')",
        "subprocess.Popen(f'ls {x}')",
    ],
)
def test_the_scan_catches_each_form(line):
    assert offences(f"x = 1\n{line}\n")


class Gadget:
    """Unpickling this would create a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the gadget ran"))


def test_a_checkpoint_carrying_a_pickle_gadget_is_refused_and_the_gadget_never_runs(tiny_gpt, tmp_path):
    model = build_model(tiny_gpt, vocab_size=11)
    checkpoint, marker = tmp_path / "ck", tmp_path / "pwned"
    save_checkpoint(checkpoint, model, {"step": 3})
    # the attacker replaces the weights by a pickle and fixes the manifest so the digest still matches
    (checkpoint / WEIGHTS).write_bytes(pickle.dumps(Gadget(marker)))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(checkpoint / WEIGHTS)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        load_checkpoint(checkpoint, model)
    assert not marker.exists(), "the pickled gadget ran while loading a checkpoint"


def test_a_resume_skips_a_gadget_checkpoint_for_the_previous_one(tiny_gpt, tmp_path):
    model = build_model(tiny_gpt, vocab_size=11)
    for step in (1, 2):
        save_checkpoint(tmp_path / f"step-{step:08d}", model, {"step": step})
    newest = tmp_path / "step-00000002"
    (newest / WEIGHTS).write_bytes(pickle.dumps(Gadget(tmp_path / "pwned")))
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(newest / WEIGHTS)
    (newest / MANIFEST).write_text(json.dumps(manifest))
    found, rejected = latest_checkpoint(tmp_path)
    assert found == tmp_path / "step-00000001"
    assert rejected and "not a safetensors file" in rejected[0]
    assert not (tmp_path / "pwned").exists()
