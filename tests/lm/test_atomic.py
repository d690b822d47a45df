"""Atomic directories and cache builds under concurrency: real processes racing for one target or one key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import data, shards
from lm.atomic import atomic_dir, build_once
from lm.classification import data as labelled

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4

# Each child imports, says it is ready, waits for "go", then races. Builds are counted in `builds-<what>`
# (one line per build) and made slow, so the others arrive while the first is still building.
CACHE_CHILD = """
import json, sys, time
from pathlib import Path
work, me = Path(sys.argv[1]), sys.argv[2]
from lm import data, shards, sources
from lm.classification import data as labelled
from lm.classification.config import LabelledFiles
from lm.config import CharTokenizerConfig, FilesData, SplitConfig

def counted(module, name):
    build = getattr(module, name)
    def wrapper(*args, **kwargs):
        with open(work / f"builds-{name}", "a") as f:
            f.write(me + "\\n")
        time.sleep(0.3)  # a slow build: the other processes arrive while it runs
        return build(*args, **kwargs)
    setattr(module, name, wrapper)

counted(sources, "iter_documents"), counted(shards, "train_tokenizer"), counted(labelled, "read_splits")
(work / f"ready-{me}").touch()
deadline = time.monotonic() + 60
while not (work / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
corpus, _ = data.build_corpus(
    FilesData(source="files", paths=("corpus",), split=SplitConfig(kind="tail", val_fraction=0.2)),
    work / "data", base_dir=work,
)
tokens = shards.tokenize_corpus(corpus.path, corpus.digest, CharTokenizerConfig(), work / "tokens")
examples = labelled.build_dataset(
    LabelledFiles(source="files", paths=("labels.jsonl",), val_fraction=0.25), work / "labelled", base_dir=work
)
print(json.dumps({"corpus": str(corpus.path), "tokens": tokens["path"], "labelled": examples["path"]}))
"""

SWAP_CHILD = """
import os, sys, time
from pathlib import Path
from lm.atomic import atomic_dir
work, me = Path(sys.argv[1]), sys.argv[2]
(work / f"ready-{me}").touch()
deadline = time.monotonic() + 60
while not (work / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
for i in range(40):
    with atomic_dir(work / "target") as tmp:
        (tmp / "a").write_text(f"{me} {i}")
        (tmp / "b").write_text(f"{me} {i}")
"""


def _race(code: str, work: Path) -> list[subprocess.CompletedProcess]:
    """Start PROCESSES children of ``code``, let them go at once when all are ready, wait for all."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / "hf")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(work), str(n)],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 90
        while len(list(work.glob("ready-*"))) < PROCESSES:
            assert time.monotonic() < deadline, "children never got ready"
            assert all(c.poll() is None for c in children), [c.communicate() for c in children]
            time.sleep(0.01)
        (work / "go").touch()
        for c in children:
            c.wait(timeout=120)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    return [subprocess.CompletedProcess(c.args, c.returncode, c.stdout.read(), c.stderr.read()) for c in children]


def test_four_processes_swapping_one_directory_all_succeed(tmp_path):
    done = _race(SWAP_CHILD, tmp_path)
    assert [d.returncode for d in done] == [0] * PROCESSES, [d.stderr[-2000:] for d in done]
    target = tmp_path / "target"
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    assert (target / "a").read_text() == (target / "b").read_text()  # one writer's whole result, never a mix
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_four_concurrent_cache_builds_all_succeed_and_build_once(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i}\n" + "the quick brown fox jumps\n" * 40)
    rows = [{"text": f"{word} example {i}", "label": word} for i in range(8) for word in ("good", "bad")]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    done = _race(CACHE_CHILD, tmp_path)

    assert [d.returncode for d in done] == [0] * PROCESSES, [d.stderr[-2000:] for d in done]
    results = [json.loads(d.stdout.splitlines()[-1]) for d in done]
    assert all(r == results[0] for r in results), results  # every process got the one result
    for what in ("iter_documents", "train_tokenizer", "read_splits"):
        assert len((tmp_path / f"builds-{what}").read_text().split()) == 1, what
    # and that result verifies as a cache hit
    index = json.loads(next((tmp_path / "data" / "index").glob("*.json")).read_text())
    assert data.cached_corpus(tmp_path / "data", data.inputs_key(index["inputs"])) is not None
    manifest = json.loads((Path(results[0]["tokens"]) / "manifest.json").read_text())
    assert shards.cached_tokens(tmp_path / "tokens", manifest["key"]) is not None
    key = next((tmp_path / "labelled" / "index").glob("*.json")).stem
    assert labelled.cached_dataset(tmp_path / "labelled", key)["path"] == results[0]["labelled"]


def test_build_once_uses_a_result_found_after_waiting_for_the_lock(tmp_path):
    found = iter([None, "theirs"])  # missing before the lock; present once the other builder finished
    assert build_once(tmp_path, "k", lambda: next(found), lambda: pytest.fail("built twice")) == "theirs"
    assert build_once(tmp_path, "k", lambda: None, lambda: "mine") == "mine"


def test_a_failed_build_leaves_the_target_as_it_was(tmp_path):
    with atomic_dir(tmp_path / "t") as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "t") as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("build failed")
    assert (tmp_path / "t" / "x").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".") or ".tmp-" in p.name] == ["t"]
