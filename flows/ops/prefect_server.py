"""Start Prefect's temporary API server early, so it boots while we import torch, MLflow and Prefect.

Without ``PREFECT_API_URL`` Prefect starts the same server lazily, at the first flow call, and waits
for it there: ≈ 5 s on this machine, during which nothing else happens. ``start()`` launches it first
thing in ``lmp run`` (the same uvicorn command Prefect uses, on a free local port) and points
``PREFECT_API_URL`` at it; ``ready()`` waits for its health check just before the flow starts. A
thread sends the server its first real request as soon as it is healthy (the first one pays the server's
database set-up, ≈ 1 s), so that too overlaps with the imports instead of delaying the flow run. The
server lives exactly as long as this process: it is stopped at exit and, on Linux, receives SIGTERM
if this process dies without stopping it.

This module must not import Prefect: that import is part of what the server start overlaps with.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from flows.ops.guard import allowed_origins
from lm.timeline import mark

STARTUP_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """The temporary Prefect server did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TemporaryServer:
    """A Prefect API server for this process only (``PREFECT_API_URL`` set while it runs)."""

    def __init__(self, log_path: Path):
        self.log_path, self.port, self.process = Path(log_path), _free_port(), None
        self._ui_url: str | None = None
        self._warming: threading.Thread | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        spec = importlib.util.find_spec("prefect")
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        command = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
            "--factory", "flows.ops.guard:create_api_app",  # Prefect's app behind the loopback Host/Origin guard
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        env = os.environ | {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(allowed_origins(self.port)),
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C in the terminal must not kill it while a checkpoint is written
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["LMP_TEMPORARY_PREFECT_API"] = "1"  # flows.prefect_links: no UI links to a UI-less server
        # No UI either: an empty UI URL keeps Prefect from printing "View at <a page that dies with us>".
        self._ui_url = os.environ.get("PREFECT_UI_URL")
        os.environ["PREFECT_UI_URL"] = ""
        atexit.register(self.stop)
        self._warming = threading.Thread(target=self._warm_up, name="prefect-server-warm-up", daemon=True)
        self._warming.start()
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _warm_up(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Once the server is healthy, ask it what Prefect's client asks first (its API version)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._healthy():
                try:
                    urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=timeout).close()
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass  # only a head start: the flow run asks again
                return
            time.sleep(0.05)

    def ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the server answers its health check; raise ServerError with its log if it cannot."""
        deadline = time.monotonic() + timeout
        if self._warming is not None:
            self._warming.join(timeout)  # healthy and warmed up, exited, or out of time: the loop below tells
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the temporary Prefect server exited with {self.process.returncode}: {self._log()}")
            if self._healthy():
                mark("server_ready")
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"the temporary Prefect server did not answer within {timeout:.0f} s: {self._log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
            os.environ.pop("LMP_TEMPORARY_PREFECT_API", None)
            if self._ui_url is None:
                os.environ.pop("PREFECT_UI_URL", None)
            else:
                os.environ["PREFECT_UI_URL"] = self._ui_url

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:] or "(no output)"
        except OSError:
            return "(no log)"


def _configured_in_files() -> bool:
    """Whether the active Prefect profile, ./prefect.toml or ./.env sets an API URL (read without Prefect)."""
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(profiles.read_text())
        active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
        if data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"):
            return True
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        if tomllib.loads(Path("prefect.toml").read_text()).get("api", {}).get("url"):
            return True
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        return any(line.strip().startswith("PREFECT_API_URL=") for line in Path(".env").read_text().splitlines())
    except OSError:
        return False


def api_configured() -> bool:
    """True when Prefect already has an API to talk to (environment, profile, settings file, test harness)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" in sys.modules:  # already imported: ask it (covers temporary_settings, e.g. a test harness)
        from prefect.settings import get_current_settings

        return bool(get_current_settings().api.url)
    return _configured_in_files()


def start_if_needed(log_path: Path) -> TemporaryServer | None:
    """Start a temporary server unless Prefect is already pointed at one."""
    return None if api_configured() else TemporaryServer(log_path).start()
