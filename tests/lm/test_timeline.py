"""The opt-in start-up timeline: nothing without LMP_TIMELINE, one JSON line per mark with it."""

from __future__ import annotations

import json

from lm import timeline


def test_off_by_default_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(timeline, "_PATH", None)
    monkeypatch.chdir(tmp_path)
    timeline.mark("first_step")
    assert list(tmp_path.iterdir()) == []


def test_each_mark_appends_one_json_line(tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setattr(timeline, "_PATH", str(path))
    timeline.mark("first_step")
    timeline.mark("last_step")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["first_step", "last_step"]
    assert records[0]["t"] <= records[1]["t"] and records[0]["cpu"] <= records[1]["cpu"]
