"""Start-up and wind-down of `lmp run`: where the seconds go before the first training step and after the last.

Runs `lmp run PIPELINE` (ingest and tokenize cached: one untimed warm-up run first) N times with Prefect's
temporary API server, then N times against a running `lmp up` (started here, its PREFECT_API_URL and
MLFLOW_TRACKING_URI passed to each run, stopped after) — with ``--modes …,up-postgresql`` also against `lmp up
--backend postgresql` (its credentials from .lmp/servers.env) — in one scratch project:
  python bench/startup.py shakespeare-quick-lstm --repeats 3
Each run appends its timeline to a file (``LMP_TIMELINE``, see ``lm/timeline.py``); t0 is taken just before
the process is spawned and ``exit`` when it has ended. Prints the median time of each phase and the
headline spans (start → first training step, last training step → exit) last, then the CPU seconds the
`lmp` process itself spent in each phase (all its threads; not the servers'), which a loaded machine
inflates far less than wall time. ``-o KEY=VALUE`` passes
overrides (e.g. ``-o train.max_steps=60`` for a quicker look: the phases outside training do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LMP = Path(sys.executable).with_name("lmp")
# The events in the order they happen; "server_ready" only with the temporary server.
EVENTS = ["imports", "server_ready", "flow_start", "first_task", "first_step", "last_step", "trained",
          "evaluated", "registered", "reported", "flow_end", "exit"]  # fmt: skip
PHASES = {
    "imports": "process start → imports done",
    "server_ready": "→ temporary server ready",
    "flow_start": "→ Prefect flow run started",
    "first_task": "→ MLflow run set up, first task",
    "first_step": "→ ingest, tokenize (cached), model built: first step",
    "last_step": "training",
    "trained": "→ final checkpoint, train task done",
    "evaluated": "→ evaluate task done",
    "registered": "→ register task done",
    "reported": "→ report task done",
    "flow_end": "→ MLflow run ended, flow body done",
    "exit": "→ flow run finished, summary, process exit",
}


def base_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    return env | {
        "XDG_CACHE_HOME": str(scratch / "cache"),  # own training slots
        "TMPDIR": str(scratch / "tmp"),
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def one_run(pipeline: str, overrides: list[str], scratch: Path, env: dict[str, str]) -> dict[str, float]:
    """One `lmp run`: seconds from spawning to each event of its timeline, and to its exit."""
    timeline = scratch / "timeline.jsonl"
    timeline.unlink(missing_ok=True)
    command = [str(LMP), "run", pipeline, *(a for o in overrides for a in ("-o", o))]
    t0 = time.time()
    done = subprocess.run(command, cwd=scratch, env=env | {"LMP_TIMELINE": str(timeline)}, capture_output=True)
    t_exit = time.time()
    if done.returncode != 0:
        sys.exit(f"lmp run failed ({done.returncode}):\n{done.stdout.decode()[-3000:]}\n{done.stderr.decode()[-3000:]}")
    marks: dict[str, float] = {}
    for line in timeline.read_text().splitlines():
        record = json.loads(line)
        marks.setdefault(record["event"], record["t"] - t0)  # the first time each happened
        marks.setdefault("cpu:" + record["event"], record["cpu"])
    return marks | {"exit": t_exit - t0}


def start_up(scratch: Path, env: dict[str, str], backend: str) -> tuple[dict[str, str], float]:
    """`lmp up --backend BACKEND`; the client environment it writes (URLs, credentials) and its wall seconds."""
    t0 = time.time()
    subprocess.run([str(LMP), "up", "--prefect-port", "4290", "--mlflow-port", "5090", "--backend", backend],
                   cwd=scratch, env=env, check=True, capture_output=True)  # fmt: skip
    took = time.time() - t0
    lines = (scratch / ".lmp" / "servers.env").read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line), took


def table(results: dict[str, list[dict[str, float]]], cpu: bool = False) -> str:
    modes = list(results)
    lines = [f"| phase ({'CPU' if cpu else 'wall'} s) | {' | '.join(modes)} |", "|---|" + "---:|" * len(modes)]

    def median(mode: str, event: str) -> float | None:
        values = [r[event] for r in results[mode] if event in r]
        return statistics.median(values) if values else None

    previous = dict.fromkeys(modes, 0.0)
    for event in EVENTS[:-1] if cpu else EVENTS:
        cells = []
        for mode in modes:
            t = median(mode, "cpu:" + event if cpu else event)
            cells.append("—" if t is None else f"{t - previous[mode]:.2f} (at {t:.2f})")
            previous[mode] = t if t is not None else previous[mode]
        lines.append(f"| {PHASES[event]} | {' | '.join(cells)} |")
    if cpu:
        return "\n".join(lines)
    for label, a, b in (("**start → first training step**", None, "first_step"),
                        ("**last training step → exit**", "last_step", "exit")):  # fmt: skip
        cells = [f"**{statistics.median(r[b] - (r[a] if a else 0.0) for r in results[m]):.2f}**" for m in modes]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", nargs="?", default="shakespeare-quick-lstm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", default="temporary,up", help="comma-separated: temporary, up, up-postgresql")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still runs `lmp down` and the clean-up
    started_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    scratch = Path(tempfile.mkdtemp(prefix="lmp-startup-"))
    (scratch / "tmp").mkdir()
    shutil.copy(ROOT / "pipelines.yaml", scratch / "pipelines.yaml")
    env = base_env(scratch)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        one_run(args.pipeline, args.override, scratch, env)  # builds the cached stages; not timed
        for mode in args.modes.split(","):
            mode_env = env
            if mode.startswith("up"):
                client, took = start_up(scratch, env, "postgresql" if mode == "up-postgresql" else "sqlite")
                print(f"{mode}: `lmp up` answered after {took:.1f} s", flush=True)
                mode_env = env | client
                one_run(args.pipeline, args.override, scratch, mode_env)  # first run on the servers: not timed
            try:
                for i in range(args.repeats):
                    results.setdefault(mode, []).append(one_run(args.pipeline, args.override, scratch, mode_env))
                    print(mode, i, {k: round(v, 2) for k, v in results[mode][-1].items()}, flush=True)
            finally:
                if mode.startswith("up"):
                    subprocess.run([str(LMP), "down"], cwd=scratch, env=env, capture_output=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.pipeline} {' '.join(args.override)}: median of {args.repeats} run(s), seconds per phase "
          f"(at: since spawn); load average {started_load} at the start, {load} at the end")  # fmt: skip
    print(table(results))
    print()
    print(table(results, cpu=True))


if __name__ == "__main__":
    main()
