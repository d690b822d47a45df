"""Set-up the stages after training need and that does not depend on training, done while the model trains.

After the last training step a run registers and reports: logging the pyfunc makes MLflow map every installed
module to its distribution (to check the pinned requirements, ≈ 0.3–1 s on this machine) and imports its model
code, and the loss-curve plot imports matplotlib (≈ 0.7 s). None of it depends on the trained weights, so a
background thread does it once training is under way (at its first metric row), where it overlaps with the
steps (torch releases the GIL in its kernels) instead of adding to the time from the last step to the exit.
It only warms caches: what runs later, and what it produces, is unchanged; any failure here is ignored.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flows.metric_sink import listening


def warm() -> None:
    """Import what registration and the report import, and fill MLflow's module → distribution map."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import mlflow.pyfunc  # noqa: F401
        from matplotlib import pyplot  # noqa: F401
        from mlflow.utils import requirements_utils
        from PIL import Image  # noqa: F401

        requirements_utils._init_modules_to_packages_map()  # cached in MLflow for the process
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
