"""lm.cache.StageCache: hits, misses, damaged entries rebuilt, index entries, one build per key, no leftovers."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from lm.cache import Entry, StageCache, inputs_key


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Stage:
    """A toy stage: writes ``text`` to ``out.txt``; verifies the file against the manifest (by key) or the
    index digest (by content). Counts its builds."""

    def __init__(self, root: Path, *, by_content: bool, text: str = "hello\n"):
        self.text, self.builds = text, 0
        self.cache = StageCache(root, self.verify, by_content=by_content)

    def verify(self, entry: Entry) -> bool:
        digest = _sha((entry.path / "out.txt").read_text())
        return digest == (entry.digest if self.cache.by_content else entry.manifest["sha"])

    def build(self, tmp: Path) -> dict:
        self.builds += 1
        (tmp / "out.txt").write_text(self.text)
        return {"digest": _sha(self.text)} if self.cache.by_content else {"sha": _sha(self.text)}

    def get(self, inputs: dict) -> Entry:
        return self.cache.get_or_build(inputs, self.build)


def _visible(root: Path) -> list[str]:
    """What a reader of ``root`` sees, lock files aside."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".locks" not in p.parts)


def test_inputs_key_is_the_sha256_of_the_sorted_json():
    assert inputs_key({"b": 1, "a": [2, 3]}) == inputs_key({"a": [2, 3], "b": 1})
    assert inputs_key({"a": 1}) == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert inputs_key({"a": 1}) != inputs_key({"a": 2})


@pytest.mark.parametrize("by_content", [False, True])
def test_a_miss_builds_and_the_next_call_reuses_it(tmp_path, by_content):
    stage, inputs = Stage(tmp_path, by_content=by_content), {"x": 1}
    first = stage.get(inputs)
    second = stage.get(inputs)
    assert stage.builds == 1
    assert (first.cached, second.cached) == (False, True)
    assert first.path == second.path and first.key == second.key == inputs_key(inputs)
    assert first.manifest == second.manifest == json.loads((first.path / "manifest.json").read_text())
    assert second.inputs == inputs
    assert stage.cache.find(first.key) is not None
    assert stage.cache.find(inputs_key({"x": 2})) is None


def test_by_key_the_directory_is_named_after_the_key(tmp_path):
    entry = Stage(tmp_path, by_content=False).get({"x": 1})
    assert entry.path == tmp_path / entry.key[:16] and entry.digest is None
    assert _visible(tmp_path) == [entry.key[:16], f"{entry.key[:16]}/manifest.json", f"{entry.key[:16]}/out.txt"]


def test_by_content_inputs_with_the_same_result_share_one_directory_through_the_index(tmp_path):
    stage = Stage(tmp_path, by_content=True)
    a, b = stage.get({"x": 1}), stage.get({"x": 2})
    assert a.path == b.path == tmp_path / _sha("hello\n")[:16] and a.digest == b.digest == _sha("hello\n")
    for entry, inputs in ((a, {"x": 1}), (b, {"x": 2})):
        index = json.loads((tmp_path / "index" / f"{entry.key}.json").read_text())
        assert index == {"digest": entry.digest, "inputs": inputs}
    assert stage.cache.find(a.key).inputs == {"x": 1}  # looked up by key alone, the index names the inputs


@pytest.mark.parametrize("by_content", [False, True])
@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "out.txt").write_text("edited\n"),
        lambda p: (p / "out.txt").unlink(),
        lambda p: (p / "manifest.json").write_text("{not json"),
        lambda p: (p / "manifest.json").write_text("[1, 2]"),
        lambda p: (p / "manifest.json").unlink(),
    ],
    ids=["edited", "file-missing", "manifest-garbled", "manifest-not-a-dict", "manifest-missing"],
)
def test_a_damaged_entry_is_not_trusted_and_is_rebuilt_whole(tmp_path, by_content, damage):
    stage = Stage(tmp_path, by_content=by_content)
    built = stage.get({"x": 1})
    damage(built.path)
    assert stage.cache.find(built.key) is None
    again = stage.get({"x": 1})
    assert (again.cached, stage.builds, again.path) == (False, 2, built.path)
    assert (again.path / "out.txt").read_text() == "hello\n"
    assert stage.get({"x": 1}).cached


@pytest.mark.parametrize("index", ["gone", "garbled", "no-digest"])
def test_an_index_entry_pointing_at_nothing_is_a_miss(tmp_path, index):
    stage = Stage(tmp_path, by_content=True)
    built = stage.get({"x": 1})
    entry_file = tmp_path / "index" / f"{built.key}.json"
    if index == "gone":
        for f in built.path.iterdir():
            f.unlink()
        built.path.rmdir()
    else:
        entry_file.write_text("{not json" if index == "garbled" else '{"inputs": {}}')
    assert stage.cache.find(built.key) is None
    again = stage.get({"x": 1})
    assert not again.cached and stage.builds == 2 and (again.path / "out.txt").exists()
    assert json.loads(entry_file.read_text())["digest"] == again.digest


@pytest.mark.parametrize("by_content", [False, True])
def test_a_failed_build_leaves_nothing_behind_and_an_earlier_copy_as_it_was(tmp_path, by_content):
    stage = Stage(tmp_path, by_content=by_content)

    def failing(tmp: Path) -> dict:
        (tmp / "out.txt").write_text("half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        stage.cache.get_or_build({"x": 1}, failing)
    assert _visible(tmp_path) == []  # no directory, no temporary, no index entry

    built = stage.get({"x": 1})
    (built.path / "out.txt").write_text("edited\n")  # damaged: the next call rebuilds, and that fails
    before = _visible(tmp_path)
    with pytest.raises(RuntimeError):
        stage.cache.get_or_build({"x": 1}, failing)
    assert _visible(tmp_path) == before and (built.path / "out.txt").read_text() == "edited\n"


def test_by_content_a_build_must_name_its_digest(tmp_path):
    cache = StageCache(tmp_path, lambda entry: True, by_content=True)
    with pytest.raises(KeyError):
        cache.get_or_build({"x": 1}, lambda tmp: {"no": "digest"})
    assert _visible(tmp_path) == []


def test_a_verify_that_raises_on_a_damaged_entry_is_a_miss(tmp_path):
    def verify(entry: Entry) -> bool:
        raise OSError("unreadable")

    cache = StageCache(tmp_path, verify)
    built = cache.get_or_build({"x": 1}, lambda tmp: {})
    assert cache.find(built.key) is None


@pytest.mark.parametrize("by_content", [False, True])
def test_callers_that_miss_at_once_build_once(tmp_path, by_content):
    stage, callers = Stage(tmp_path, by_content=by_content), 4
    start, results, errors = threading.Barrier(callers), [], []
    build = stage.build

    def slow(tmp: Path) -> dict:
        time.sleep(0.2)  # the other callers arrive while this one builds
        return build(tmp)

    def call():
        try:
            start.wait()
            results.append(stage.cache.get_or_build({"x": 1}, slow))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and stage.builds == 1
    assert sorted(r.cached for r in results) == [False] + [True] * (callers - 1)
    assert len({r.path for r in results}) == 1
