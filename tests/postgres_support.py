"""A throwaway PostgreSQL server for the tests that run a Dagster instance on Postgres (dagster-postgres).

The server is Debian's `postgresql` (installed by `make postgres`, which `make test-slow` runs first): the
test starts its own cluster with ``initdb`` in a temporary directory, listening on a free loopback port (and
a Unix socket in the same directory), and stops it and deletes the directory afterwards, even when the test
fails. Postgres refuses to run as root, so as root the cluster belongs to the ``postgres`` system user that
the Debian package creates (``runuser -u postgres``); as any other user it runs as that user.

A machine without Postgres fails the test with a message saying so (`make test-slow` is run by hand, so a
failure is the right signal there, not a silent skip).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_support import free_port

SUPERUSER = "postgres"  # the cluster's superuser (initdb -U), whoever owns the processes
DB_NAME = "dagster"
NOT_INSTALLED = ("PostgreSQL is not installed ({what}): run `make postgres` (Debian's `postgresql` package, "
                 "needs apt-get as root or sudo); tests/test_postgres_instance.py needs a real server")


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: where to reach it and how a dagster.yaml names it."""

    host: str
    port: int
    db_name: str
    username: str
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.username}@{self.host}:{self.port}/{self.db_name}"

    def env(self) -> dict[str, str]:
        """The variables the generated dagster.yaml's Postgres block reads (sd_assets/demo.py, DAGSTER_YAML)."""
        return {"DAGSTER_PG_USERNAME": self.username, "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST": self.host,
                "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": self.db_name}


def postgres_bindir() -> Path:
    """The directory with initdb/pg_ctl: Debian keeps them in /usr/lib/postgresql/<major>/bin (not on PATH);
    elsewhere they are on PATH. Fails the test, saying how to install Postgres, when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    initdb = candidates[-1] if candidates else shutil.which("initdb")
    if not initdb:
        pytest.fail(NOT_INSTALLED.format(what="no initdb in /usr/lib/postgresql/*/bin or on PATH"))
    bindir = Path(initdb).resolve().parent
    if not (bindir / "pg_ctl").exists():
        pytest.fail(NOT_INSTALLED.format(what=f"{bindir} has initdb but no pg_ctl"))
    return bindir


def _as_server_user() -> list[str]:
    """The command prefix that runs a Postgres program as a user it accepts: root is refused by Postgres, so
    as root run it as the Debian package's ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(NOT_INSTALLED.format(what="running as root and there is no `postgres` system user to run "
                                              "the server as"))
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root, Postgres must run as another user, but `runuser` (util-linux) is missing")
    return [runuser, "-u", "postgres", "--"]


def _run(args: list[str], what: str, log: Path | None = None, timeout: float = 120) -> None:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        pytest.fail(f"{what} failed ({res.returncode}): {' '.join(args)}\n{res.stdout[-3000:]}\n"
                    f"{res.stderr[-3000:]}\n{tail}")


def _private_dir() -> Path:
    """A fresh directory the server's user owns: not under pytest's tmp_path, which is private to the test's
    user (mode 0700) and so unreadable to ``postgres`` when we are root. Short, so the socket path fits."""
    d = Path(tempfile.mkdtemp(prefix="sd-pg-"))
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(d, pg.pw_uid, pg.pw_gid)
    return d


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + pg_ctl start on a free loopback port; yields the server with database `DB_NAME` created; stops
    it (fast, then immediate) and deletes its files on exit."""
    bindir, prefix = postgres_bindir(), _as_server_user()
    base = _private_dir()
    data, log, port = base / "data", base / "server.log", free_port()
    try:
        # trust auth: only this machine's loopback and a socket in a private directory reach it
        _run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
              "--no-sync"], "initdb")
        # fsync off: a test cluster thrown away afterwards; max_connections: a daemon, 3 runs and their
        # code servers each hold a few connections
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off "
                f"-c max_connections=200")
        _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60",
              "start"], "pg_ctl start", log)
        server = PostgresServer("127.0.0.1", port, DB_NAME, SUPERUSER, data, log)
        try:
            _run([*prefix, str(bindir / "createdb"), "-h", str(base), "-p", str(port), "-U", SUPERUSER, DB_NAME],
                 "createdb", log)
            yield server
        finally:
            _stop(prefix, bindir, data)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _stop(prefix: list[str], bindir: Path, data: Path) -> None:
    """pg_ctl stop: fast (disconnects clients still holding connections), immediate if that hangs."""
    for mode in ("fast", "immediate"):
        res = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "30",
                              "stop"], capture_output=True, text=True, timeout=60)
        if res.returncode == 0 or "not running" in res.stderr or "No such file" in res.stderr:
            return


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A Postgres server for one test module (see `postgres_server`)."""
    with postgres_server() as server:
        yield server
