"""The MLflow UI in a real browser (headless Chromium, driven over the DevTools protocol) against `lmp ui` on a
project store with finished pipeline runs: the experiment opens in model-training mode, a run shows its loss curve,
description and model card, and the registered model shows its @champion. The UI is a JavaScript app: each check
waits (with a deadline) for the rendered text, as a user would."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.flows.helpers import free_port

LMP = str(Path(sys.executable).with_name("lmp"))
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"),
        reason="no Chromium here (apt-get install -y chromium); CI installs it and runs this test",
    ),
]
PAGE_DEADLINE_S = 60
CHROMIUM_FLAGS = [  # a tall window: the UI draws a metric chart only in view; no sandbox: root in CI, local pages only
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-breakpad",
    "--disable-crash-reporter",
    "--window-size=1400,4000", "--remote-debugging-port=0", "--remote-allow-origins=*",
]  # fmt: skip


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _until(what: str, check, deadline_s: float):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)  # bounded poll of a real process
    raise AssertionError(f"{what} within {deadline_s} s")


class Browser:
    """One headless Chromium page, driven over the DevTools protocol (a websocket; no extra package)."""

    def __init__(self, workdir: Path):
        from websockets.sync.client import connect

        assert CHROMIUM is not None, "Chromium is not installed (CI: .ci/run installs it with apt-get)"
        self.workdir, profile = workdir, workdir / "profile"
        command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        with open(workdir / "chromium.log", "w") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        active = profile / "DevToolsActivePort"
        _until("Chromium opened its DevTools port", lambda: active.exists() and active.read_text().strip(), 60)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket, self.calls = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30), 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, *expected: str, absent: tuple[str, ...] = (), name: str = "page") -> str:
        """Navigate to ``url`` and wait until its rendered text (whitespace runs made one space) holds every
        ``expected`` string; returns the text.
        On a timeout the assertion names what is missing and a screenshot is left in the test's directory."""
        self.call("Page.navigate", url=url)
        deadline, text = time.monotonic() + PAGE_DEADLINE_S, ""
        while time.monotonic() < deadline:
            text = " ".join((self.evaluate("document.body ? document.body.innerText : ''") or "").split())
            if all(e in text for e in expected):
                break
            time.sleep(0.25)  # bounded poll of the rendering page
        missing = [e for e in expected if e not in text]
        if missing:
            shot = self.workdir / f"{name}.png"
            shot.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))
        assert not missing, f"{url}: {missing} not shown within {PAGE_DEADLINE_S} s (see {shot}):\n{text[:2000]}"
        shown = [a for a in absent if a in text]
        assert not shown, f"{url} shows {shown}:\n{text[:2000]}"
        return text

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            _stop(self.process)


@pytest.fixture(scope="module")
def store_uri(store_dir) -> str:
    """The session's project store: finished runs of `smoke`, registered with an @champion."""
    from flows import tracking

    return tracking.default_tracking_uri(store_dir)


@contextmanager
def running_ui(project: Path, store_uri: str) -> Iterator[str]:
    """`lmp ui` on a project's store, started in the project directory as a user would; yields its base URL."""
    port, log = free_port(), project / "ui-browser.log"
    env = os.environ | {"MLFLOW_TRACKING_URI": store_uri}
    with open(log, "w") as out:
        server = subprocess.Popen([LMP, "ui", "--port", str(port)], cwd=project, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            assert server.poll() is None, log.read_text()[-3000:]
            return False

    try:
        _until("`lmp ui` answered", healthy, 90)
        yield base
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def ui(store_dir, store_uri):
    """`lmp ui` on the session's store."""
    with running_ui(store_dir, store_uri) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    workdir = Path(tempfile.mkdtemp(dir=tmp_path_factory.mktemp("chromium")))
    browser = Browser(workdir)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def smoke(store_uri):
    """The newest finished run of `smoke`, its experiment, and the registered @champion version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    experiment = client.get_experiment_by_name("smoke")
    [run] = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1)
    champion = client.get_model_version_by_alias("smoke", "champion")
    return experiment, run, champion


def test_the_experiment_opens_in_model_training_mode_with_its_runs(ui, browser, smoke):
    from flows import tracking

    experiment, run, _ = smoke
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = tracking.ui_url(ui, f"experiments/{experiment.experiment_id}")  # the address `lmp ui` prints
    browser.open(url, run.info.run_name, "Model registry", "Columns", absent=("Token Usage",), name="experiment")


def test_a_run_shows_its_loss_curve_description_and_model_card(ui, browser, smoke):
    from flows import tracking

    experiment, run, _ = smoke
    page = f"experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    browser.open(tracking.ui_url(ui, page), "Pipeline smoke", "a fresh run", name="run")  # its description
    browser.open(tracking.ui_url(ui, f"{page}/model-metrics"), f"{run.info.run_name} (train_loss)", name="metrics")
    assert browser.evaluate("document.querySelectorAll('svg.main-svg').length") > 0  # charts drawn, not spinners
    card = browser.open(tracking.ui_url(ui, f"{page}/artifacts/model_card.md"), "registered model", name="card")
    assert "model_card.md" in card and "models:/smoke/" in card


def test_the_registered_model_shows_its_champion(ui, browser, smoke):
    from flows import tracking

    *_, champion = smoke
    browser.open(tracking.ui_url(ui, "models/smoke"), f"Version {champion.version}", "@ champion", name="model")
