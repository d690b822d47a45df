"""Set-up a stage after training needs that does not depend on training, done while the model trains.

Every run's report draws the loss curve, and importing matplotlib for it costs ≈ 0.7 s of CPU on this machine
(≈ 1 s of wall time after the last training step). A background thread imports it once training is under way
(at its first metric row), where it overlaps with the steps (torch releases the GIL in its kernels) instead of
adding to the time from the last step to the exit. It only warms the import: what runs later, and what it
produces, is unchanged; a failure here is ignored (the report imports it again and says what is wrong).

Not warmed here, on purpose: MLflow's pyfunc code and its module → distribution map (≈ 1 s of CPU before a
model is logged) — a rerun whose weights are already registered logs no model, and on two cores the work
would only be moved into training.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flows.metric_sink import listening


def warm() -> None:
    """Import what the report's loss curve imports (``flows.registry.reports.loss_curve_png``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: F401
    except Exception:  # noqa: BLE001 — only a head start: the stages do their own set-up when this could not
        pass


def start() -> threading.Thread:
    thread = threading.Thread(target=warm, name="lmp-prewarm", daemon=True)
    thread.start()
    return thread


@contextmanager
def during_training(distributed: bool) -> Iterator[None]:
    """Run ``warm`` in the background once training reports its first metrics (at once for a distributed job,
    whose ranks train in other processes)."""
    if distributed:
        start()
        yield
        return
    started: list[threading.Thread] = []

    def first_row(step: int, metrics) -> None:
        if not started:
            started.append(start())

    with listening(first_row):
        yield
