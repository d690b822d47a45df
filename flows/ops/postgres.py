"""The PostgreSQL server behind `lmp up --backend postgresql`: one cluster under ``.lmp/postgres``, on 127.0.0.1.

PostgreSQL's own binaries (Debian's ``postgresql`` package: ``/usr/lib/postgresql/<version>/bin``, or ``initdb``
and ``postgres`` on PATH). The cluster is made once (``initdb``, password authentication only, scram-sha-256) with
a generated password for its one role, ``lmp``; it listens on 127.0.0.1 only and has no Unix socket. It holds
three databases: ``prefect`` (the Prefect server's), ``mlflow`` (MLflow's tracking and registry) and
``mlflow_auth`` (the users of MLflow's basic-auth app). The password reaches the clients through ``PGPASSWORD``
in their environment, never in a command line or a URL.

PostgreSQL refuses to run as root. Under root the cluster belongs to the ``postgres`` account (which Debian's
package creates), and its processes run as that account with one capability, CAP_DAC_READ_SEARCH, so they can
reach a data directory under a project that only root may enter.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

from lm.atomic import atomic_write_bytes

ROLE = "lmp"
DATABASES = ("prefect", "mlflow", "mlflow_auth")
SYSTEM_ACCOUNT = "postgres"


class PostgresError(RuntimeError):
    """PostgreSQL cannot be set up or started as asked; the message says why and what to do."""


def binaries() -> Path:
    """The directory holding ``initdb`` and ``postgres``: PATH first, then Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version, reverse=True)
    if found:
        return Path(found[0]).parent
    raise PostgresError(
        "PostgreSQL is not installed (no initdb/postgres on PATH or in /usr/lib/postgresql/*/bin): install it "
        "(Debian: apt-get install postgresql) and run `lmp up --backend postgresql` again"
    )


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"/postgresql/(\d+)", path)) or (0,)


def as_owner() -> list[str]:
    """The prefix that runs a PostgreSQL program as the cluster's owner: nothing, or (under root) ``setpriv``
    to the postgres account with CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_ACCOUNT)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root and there is no {SYSTEM_ACCOUNT!r} account to run it as: install "
            "Debian's postgresql package (it creates the account) or run `lmp up` as a regular user"
        ) from None
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    caps = "+dac_read_search"
    return [setpriv, f"--reuid={SYSTEM_ACCOUNT}", f"--regid={SYSTEM_ACCOUNT}", "--init-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}"]  # fmt: skip


def _give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        account = pwd.getpwnam(SYSTEM_ACCOUNT)
        os.chown(path, account.pw_uid, account.pw_gid)


def initialise(directory: Path, password: str, log: Path) -> Path:
    """Make the cluster in ``directory/data`` unless it exists; returns the data directory."""
    data = Path(directory) / "data"
    if (data / "PG_VERSION").exists():
        return data
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _give_to_owner(directory)
    staging = directory / f"data.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pwfile = directory / "initdb-password"
    atomic_write_bytes(pwfile, password.encode() + b"\n")  # mode 600, removed as soon as initdb read it
    _give_to_owner(pwfile)
    try:
        with open(log, "ab") as out:
            done = subprocess.run(
                [*as_owner(), str(binaries() / "initdb"), "-D", str(staging), "-U", ROLE, "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale", "--no-instructions"],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=120,
            )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise PostgresError(f"initdb failed (exit {done.returncode}); see {log}")
    staging.rename(data)  # a half-made cluster is never taken for a whole one
    return data


def command(data: Path, port: int) -> list[str]:
    """The server on 127.0.0.1:``port`` only, no Unix socket, room for two servers' pools and their clients."""
    return [*as_owner(), str(binaries() / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1",
            "-p", str(port), "-c", "unix_socket_directories=", "-c", "max_connections=200"]  # fmt: skip


def wait_ready(port: int, password: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    """Wait until the server takes a connection, then create the databases it lacks."""
    import psycopg2

    while True:
        if process.poll() is not None:
            raise PostgresError(f"PostgreSQL exited with {process.returncode} before answering; see {log}")
        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=port, user=ROLE, password=password, dbname="postgres", connect_timeout=2
            )
            break
        except psycopg2.OperationalError as e:
            if "password authentication failed" in str(e):
                raise PostgresError(
                    f"the PostgreSQL cluster in {log.parent} does not take the password recorded for it; "
                    "move the old cluster away (.lmp/postgres) to start a new one"
                ) from None
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL on 127.0.0.1:{port} did not answer in time; see {log}") from None
        time.sleep(0.2)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cursor.fetchall()}
            for name in DATABASES:
                if name not in existing:
                    cursor.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
    finally:
        connection.close()


def url(port: int, database: str, driver: str = "postgresql+psycopg2") -> str:
    """A SQLAlchemy database URL without the password (PGPASSWORD supplies it). The driver is named: SQLAlchemy 2.1
    takes a bare ``postgresql://`` to mean psycopg 3."""
    return f"{driver}://{ROLE}@127.0.0.1:{port}/{database}"
