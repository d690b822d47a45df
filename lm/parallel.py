"""Run independent jobs — a module-level function over a list of JSON arguments — in this process, in local
worker processes, or on the workers of a Dask scheduler; results come back in job order.

Used by the data stages to encode shards. Jobs read and write files by path: local workers share this
machine's disk, Dask workers need the same paths (a shared file system). Local workers are plain
``python -m lm.parallel`` subprocesses fed JSON lines — not ``multiprocessing``, which re-runs the caller's
main script in every child unless it is guarded by ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from lm.errors import DataError


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_jobs(
    fn: Callable[..., dict], jobs: list[dict], *, processes: int | None = None, scheduler_address: str | None = None
) -> list[dict]:
    """``[fn(job, alone=...) for job in jobs]``, spread out: over the Dask scheduler's workers when an address
    is given, else over up to ``processes`` local worker processes (default: the cores available). ``alone``
    tells ``fn`` whether it has the machine to itself (here, in this process) and may use threads of its own,
    or shares it with the other jobs. ``fn`` must be a module-level function; jobs and results are JSON."""
    if scheduler_address:
        return _on_dask(partial(fn, alone=False), jobs, scheduler_address)
    workers = min(processes or available_cores(), len(jobs))
    if workers <= 1:
        return [fn(job, alone=True) for job in jobs]
    return _on_processes(f"{fn.__module__}:{fn.__qualname__}", jobs, workers)


def _on_processes(target: str, jobs: list[dict], workers: int) -> list[dict]:
    """Each worker takes the next job as it finishes one; the first failure stops the others."""
    todo: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    results: list[dict | None] = [None] * len(jobs)
    failures: list[str] = []

    def drive() -> None:
        with subprocess.Popen([sys.executable, "-m", "lm.parallel", target], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as proc:  # fmt: skip
            try:
                while not failures:
                    try:
                        i, job = todo.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    reply = json.loads(proc.stdout.readline() or '{"error": "the worker process died"}')
                    if "error" in reply:
                        failures.append(reply["error"])
                    results[i] = reply.get("result")
            finally:
                proc.stdin.close()

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise DataError(f"a data worker failed: {failures[0]}")
    return results  # type: ignore[return-value]


def _on_dask(fn: Callable[[Any], dict], jobs: list[dict], address: str) -> list[dict]:
    from distributed import Client

    try:
        client = Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise DataError(
            f"data_workers.scheduler_address {address}: no Dask scheduler answered ({type(e).__name__}: {e}); "
            "start one (`dask scheduler`, then `dask worker ADDRESS` on each host) or remove the setting"
        ) from None
    with client:
        return client.gather(client.map(fn, jobs, pure=False))


def _serve(target: str) -> None:
    """A worker: one JSON job per stdin line, one ``{"result": …}`` or ``{"error": …}`` line back for each."""
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    for line in sys.stdin:
        try:
            reply = {"result": fn(json.loads(line), alone=False)}
        except Exception as e:  # reported to the caller, which raises it with the job's context
            reply = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
