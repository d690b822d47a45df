"""Simulated hosts for tests: Linux network namespaces joined by veth pairs, created and torn down here.

``Hosts`` makes three namespaces — ``servers`` (the shared Prefect, MLflow and PostgreSQL servers), ``a`` and
``b`` (two "hosts" that train) — each joined to a bridge inside ``servers`` by its own veth pair, all on one /24
taken from 198.18.0.0/15 (RFC 2544's range for test networks, which nothing on these machines routes) after
checking that no interface or route of the machine already uses it. Traffic between them never leaves the
namespaces: the host's own interfaces and routes are not touched. ``exec`` runs a command inside a namespace (an
argument list through ``ip netns exec``); ``close`` kills every process left in the namespaces and deletes them.

Needs root and the ``ip`` tool; ``unavailable()`` says why they cannot be made here, else None, and ``require``
skips a test for that reason (fails it under CI).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"
RANGE = ipaddress.ip_network("198.18.0.0/15")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made on this machine (not root, no ``ip``, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path(IP).exists():
        return "the `ip` tool (iproute2) is not installed"
    probe = f"lmp-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"a bridge cannot be made in a namespace here: {bridge.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require(missing: str | None) -> None:
    """Skip a test whose simulated hosts (or what runs on them) cannot be had here, because of ``missing``; under
    CI, fail it instead: .ci/run installs what these tests need, so a missing piece there is a broken CI."""
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but {missing} (.ci/run installs what it needs)")
    pytest.skip(missing)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine's interfaces and routes use."""
    used = []
    lines = _ip("-4", "-o", "addr", "show").stdout.splitlines()
    lines += _ip("-4", "route", "show", "table", "all").stdout.splitlines()
    for line in lines:
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    return [n for n in used if n.version == 4 and n.prefixlen > 0]


def free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that overlaps nothing the machine uses (first try chosen by ``seed``)."""
    subnets = list(RANGE.subnets(new_prefix=24))
    used = _used_networks()
    for i in range(len(subnets)):
        candidate = subnets[(seed + i) % len(subnets)]
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError("every /24 of 198.18.0.0/15 is in use on this machine")


class Hosts:
    """Namespaces ``servers``, ``a`` and ``b`` on one private /24; ``addr[name]`` is each one's address."""

    NAMES = ("servers", "a", "b")

    def __init__(self) -> None:
        tag = f"lmp{os.getpid() % 100000}"
        self.ns = {name: f"{tag}-{name}" for name in self.NAMES}
        self.subnet = free_subnet(os.getpid())
        hosts = list(self.subnet.hosts())
        self.addr = {name: str(hosts[i]) for i, name in enumerate(self.NAMES)}
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        hub = self.ns["servers"]
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.addr['servers']}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for name in ("a", "b"):
            # One veth pair per host: `eth0` inside the host's namespace, `port-<name>` on the bridge.
            _ip("link", "add", "eth0", "netns", self.ns[name], "type", "veth", "peer", "name", f"port-{name}",
                "netns", hub)  # fmt: skip
            _ip("-n", hub, "link", "set", f"port-{name}", "master", "br0", "up")
            _ip("-n", self.ns[name], "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            _ip("-n", self.ns[name], "link", "set", "eth0", "up")

    def command(self, name: str, args: list[str]) -> list[str]:
        """``args`` run inside namespace ``name``."""
        return [IP, "netns", "exec", self.ns[name], *args]

    def run(self, name: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        return subprocess.run(self.command(name, args), **kwargs)

    def popen(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(name, args), start_new_session=True, **kwargs)

    def pids(self, name: str) -> list[int]:
        found = _ip("netns", "pids", self.ns[name], check=False)
        return [int(p) for p in found.stdout.split()]

    def close(self) -> None:
        """Kill what still runs in the namespaces (TERM, then KILL after 20 s) and delete them."""
        existing = set(_ip("netns", "list", check=False).stdout.split())
        names = [ns for ns in self.ns.values() if ns in existing]
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            pids = [pid for ns in names for pid in map(int, _ip("netns", "pids", ns, check=False).stdout.split())]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _exists(pid)]
                time.sleep(0.1)
            if not pids:
                break
        for ns in names:
            _ip("netns", "del", ns, check=False)


def _exists(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own children
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
