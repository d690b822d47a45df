"""The Prefect server `lmp up` starts, behind a guard that only this machine's own pages can pass.

Prefect's server has no authentication and, by default, answers any web page the user happens to open:
CORS allows every origin, and a foreign ``Host:`` (DNS rebinding: ``evil.example`` resolving to
127.0.0.1) is served like a local one. `lmp up` therefore starts Prefect with CORS limited to its own
origin and CSRF protection on (Prefect settings, see ``flows.ops.servers``), and serves it through
``create_app`` here, which refuses before Prefect sees them

- a request whose ``Host:`` is not a loopback name (127.0.0.1, localhost, [::1], with or without the port);
- a request that carries an ``Origin:`` other than the server's own — also the "simple" cross-origin POSTs
  a browser sends without asking first.

The Prefect client and the runner send no ``Origin`` and a ``Host`` of 127.0.0.1:PORT; the UI in a browser is
same-origin. Both pass. Started as ``uvicorn --factory flows.ops.guard:create_app``; the port comes from
``PREFECT_SERVER_API_PORT`` (set by ``flows.ops.servers``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("uvicorn.error")  # the server log, .lmp/logs/prefect-server.log
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _names(address: str) -> tuple[str, ...]:
    """The names the server answers to: the loopback ones, and the address it is bound to beyond them (a server
    shared with other hosts under `lmp up --backend postgresql --host ADDRESS`, where it asks for credentials)."""
    return LOOPBACK if address in ("127.0.0.1", "localhost") else (*LOOPBACK, address)


def allowed_hosts(port: int, address: str = "127.0.0.1") -> frozenset[str]:
    """The ``Host:`` values accepted: each of the server's names, bare or with its port."""
    names = _names(address)
    return frozenset(names) | {f"{name}:{port}" for name in names}


def allowed_origins(port: int, address: str = "127.0.0.1") -> tuple[str, ...]:
    """The server's own origins (the UI opened at any of its names)."""
    return tuple(f"http://{name}:{port}" for name in _names(address))


class LoopbackGuard:
    """ASGI middleware: refuse a foreign ``Host`` or ``Origin`` with 403 (HTTP) or a refused handshake (websocket)."""

    def __init__(self, app, port: int, address: str = "127.0.0.1"):
        self.app, self.hosts = app, allowed_hosts(port, address)
        self.origins = frozenset(allowed_origins(port, address))

    def refusal(self, scope) -> str | None:
        """Why this request is refused, or None when it may pass."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return f"host {host!r} is not one of this server's names"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return f"origin {origin!r} is not this server's own"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or (reason := self.refusal(scope)) is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s: %s", scope.get("method", "websocket"), scope.get("path", ""), reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason})  # before accept: a 403
            return
        body = f"refused: {reason}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app():
    """Prefect's full server app (API, UI and services, as `prefect server start` builds it), guarded."""
    from prefect.server.api.server import create_app as prefect_app

    port, address = int(os.environ["PREFECT_SERVER_API_PORT"]), os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1")
    return LoopbackGuard(prefect_app(final=True), port, address)


def create_api_app():
    """The API-only server `lmp run` starts for itself (flows.ops.prefect_server), behind the same guard: it lives
    for one run on a random port, but a page that guessed the port still must not read or change runs."""
    from prefect.server.api.server import create_app as prefect_app

    return LoopbackGuard(prefect_app(), int(os.environ["PREFECT_SERVER_API_PORT"]))
