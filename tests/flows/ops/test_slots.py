"""Training slots: one holder at a time, and a killed holder's slot is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from flows.ops import slots

HOLD = """
import sys, time
from flows.ops.slots import training_slot
with training_slot(1):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_frees_its_slot(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waits: list[str] = []
        import fcntl

        with open(slots.lock_dir() / "train-0.lock", "a+") as probe:  # the slot is taken right now
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the slot should be held by the other process")
            except BlockingIOError:
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with slots.training_slot(1, on_wait=waits.append) as waited:
            assert waited < 5 and waits == []  # free at once: the kernel released the dead holder's lock
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_several_slots_let_that_many_hold_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    waits: list[str] = []
    with slots.training_slot(2, on_wait=waits.append), slots.training_slot(2, on_wait=waits.append):
        pass  # two slots: the second does not wait (flock locks are per open file, so this works in-process)
    assert waits == []


HOLD_AS = """
import sys, time
from flows.ops.slots import training_slot
with training_slot(1, holder="shakespeare-char-gpt"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_wait_names_the_pipeline_pid_and_start_of_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AS], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waits: list[str] = []

        def on_wait(message: str) -> None:
            waits.append(message)
            holder.kill()  # the kernel frees the slot: the wait below ends

        with slots.training_slot(1, on_wait=on_wait, holder="me"):
            pass
        [message] = waits
        assert message.startswith(f"waiting for a training slot held by shakespeare-char-gpt (pid {holder.pid}, since ")
        since = message.split("since ")[1].rstrip(")")
        assert len(since) == 8 and since.count(":") == 2, message  # HH:MM:SS, local time
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_the_lock_file_names_its_holder_while_held(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with slots.training_slot(1, holder="p"):
        assert slots.holders(1) == [slots.Holder("p", os.getpid(), slots.holders(1)[0].since)]
