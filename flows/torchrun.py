"""Launch a train task's ranks with ``torchrun`` and turn its outcome into a result or a clear error.

The command is an argument list (no shell): ``python -m torch.distributed.run --standalone
--nproc-per-node N … -m flows.ddp_worker JOB.json`` on one host; with ``nnodes > 1`` a static rendezvous
at ``master_addr:master_port`` that every host joins with the same command and its own ``--node-rank``
(logged for each other host).
The ranks' output goes to ``<run dir>/torchrun.log``. A failed rank fails the task with that rank's
number, exit code and error (torchrun's "root cause"); the checkpoints written before stay, so the next
run — or a Prefect retry — resumes from them.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows import tracking
from lm.atomic import atomic_write_bytes
from lm.errors import DataError
from lm.results import Trained
from lm.training import TrainingError, TrainingInterrupted


class RankFailed(RuntimeError):
    """A rank of a distributed train task failed (a transient error: a retry resumes)."""


class Job(BaseModel):
    """What every rank reads (``job.json``): the spec, the task's encoded data and initialising model (JSON),
    the run directory, the MLflow run and the checkpoint to resume from."""

    model_config = ConfigDict(frozen=True)
    spec: dict
    encoded: dict
    init: dict | None
    run_id: str
    out: str
    resume_from: str | None
    replaying: bool
    peak_flops: float
    tracking_uri: str


def command(cfg, job: Path, node_rank: int | None = None) -> list[str]:
    """The torchrun argument list for node ``node_rank`` (default: ``cfg.node_rank``, this host's).

    Several hosts meet in torchrun's static rendezvous: node 0 (the host that runs ``lmp run``) serves the store
    at ``master_addr:master_port`` and every rank connects there, so global rank 0 (which logs to MLflow and
    writes the checkpoints and ``result.json``) runs on node 0. The c10d rendezvous would not do: node 0 hosts
    its store only when ``master_addr`` resolves like the machine's hostname, and it hands the ranks the
    hostname's address, not ``master_addr``."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cfg.nnodes),
            "--nproc-per-node", str(cfg.nproc_per_node), "--max-restarts", "0"]  # fmt: skip
    if cfg.nnodes == 1:
        args += ["--standalone"]
    else:
        rank = cfg.node_rank if node_rank is None else node_rank
        args += ["--node-rank", str(rank), "--master-addr", cfg.master_addr, "--master-port", str(cfg.master_port)]
    return args + ["-m", "flows.ddp_worker", str(job)]


def other_nodes(cfg, job: Path) -> list[str]:
    """For each other host, the line that tells its user what to run there (the real job path, shell-quoted)."""
    where = shlex.quote(str(Path.cwd()))
    return [
        f"train: node {k} of {cfg.nnodes}: on its host, in {where}, run: {shlex.join(command(cfg, job, k))}"
        for k in range(cfg.nnodes)
        if k != cfg.node_rank
    ]


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


def failures(log: str) -> list[dict[str, str]]:
    """Every failed rank in torchrun's summary: rank, exitcode, traceback (the "Failures" and "Root Cause")."""
    summary = log[log.rfind("Failures:") :] if "Failures:" in log else log[log.rfind("Root Cause") :]
    entries = []
    for block in re.split(r"^\[\d+\]:\s*$", summary, flags=re.MULTILINE)[1:]:
        fields = dict(re.findall(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*)$", block, flags=re.MULTILINE))
        if "rank" in fields:
            fields["rank"] = fields["rank"].split()[0]
            entries.append(fields)
    return entries


def culprit(entries: list[dict[str, str]], log: str) -> dict[str, str] | None:
    """The rank that caused the failure: one killed by a signal other than torchrun's SIGTERM, else one
    that raised an error other than losing its peers, else torchrun's first observed failure."""
    for entry in entries:
        code = entry.get("exitcode", "").split()[0] if entry.get("exitcode") else ""
        if code.startswith("-") and code != "-15":
            return entry
    for entry in entries:
        raised = _raised(entry["rank"], log)
        if raised and not any(p in raised for p in PEER_LOST):
            return entry
    return entries[-1] if entries else None


def _raised(rank: str, log: str) -> str:
    lines = re.findall(rf"^\[rank{rank}\]: (\w+(?:\.\w+)*(?:Error|Exception): .*)$", log, flags=re.MULTILINE)
    return lines[-1] if lines else ""


def root_cause(log: str) -> str:
    """The failing rank as one line: its number, exit code and error."""
    entry = culprit(failures(log), log)
    if entry is None:
        tail = [line for line in log.strip().splitlines() if line.strip()][-5:]
        return "torchrun failed: " + " | ".join(tail)
    error = entry.get("traceback", "")
    if error.startswith(("To enable traceback", "Traceback")):  # the error is in the rank's own output
        error = ""
    code = " ".join(entry.get("exitcode", "?").split())
    killed = code.startswith("-") and error  # a signal: torchrun's line says which; the rank printed nothing
    why = error if killed else (_raised(entry["rank"], log) or error or "see the log")
    return f"rank {entry['rank']} failed (exit code {code}): {why}"


def run(spec, job: Job, out: Path, *, should_stop, log) -> Trained:
    """Run the ranks to completion; rank 0's ``result.json``. Raises RankFailed, TrainingError or DataError."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    job_path = out / "job.json"
    atomic_write_bytes(job_path, job.model_dump_json().encode())
    args = command(spec.train.distributed, job_path)
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    log.info("train: %d processes per node on %d node(s): %s", spec.train.distributed.nproc_per_node,
             spec.train.distributed.nnodes, " ".join(args))  # fmt: skip
    for line in other_nodes(spec.train.distributed, job_path):
        log.info("%s", line)
    with open(out / "torchrun.log", "w") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            shown, last_poll = -1, time.monotonic()
            while proc.poll() is None:
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if should_stop():  # forward the stop request: rank 0 checkpoints, every rank stops
                        os.killpg(proc.pid, signal.SIGTERM)
                        proc.wait()
                    elif time.monotonic() - last_poll > 2.0:  # the progress bar follows rank 0's metrics
                        shown, last_poll = tracking.relay(job.run_id, shown), time.monotonic()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    text = (out / "torchrun.log").read_text(encoding="utf-8", errors="replace")
    if proc.returncode == 0 and (out / "result.json").exists():
        return Trained.model_validate_json((out / "result.json").read_text())
    if should_stop():
        from lm.checkpoint import latest_checkpoint

        checkpoint, _ = latest_checkpoint(out)
        step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
        raise TrainingInterrupted(step, checkpoint)
    cause = root_cause(text)
    message = f"distributed training failed — {cause}; log: {out / 'torchrun.log'}. Checkpoints written before stay"
    if "TrackingUnavailable" in cause:
        raise tracking.TrackingUnavailable(message)
    if "TrainingError" in cause:
        raise TrainingError(message)
    if "DataError" in cause:
        raise DataError(message)
    raise RankFailed(message + "; the next run (or a retry) resumes from the newest one")
