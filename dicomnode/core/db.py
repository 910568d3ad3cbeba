"""SQLite connections for the node's durable stores (index, job queue, outbox).

Each store keeps one connection per thread (sqlite3 connections must not be used
by two threads at once), in WAL mode so that readers never block the writer and
several processes may share a file. Connections of threads that have finished
(e.g. a lease heartbeat per job) are closed when the next one is opened.

The database files (and SQLite's ``-wal`` and ``-shm``, which take the database's mode)
are made owner-only when first opened, whatever the umask: they hold patient data.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

LOG = logging.getLogger(__name__)


class ThreadLocalSQLite:
    """One WAL connection per thread to ``path``, and BEGIN IMMEDIATE transactions."""

    def __init__(self, path: Path, *, synchronous: Literal["NORMAL", "FULL"] = "FULL",
                 timeout: float = 30.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous: must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._synchronous = synchronous
        self._timeout = float(timeout)
        self._local = threading.local()
        self._all: dict[threading.Thread, sqlite3.Connection] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._restricted = False

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            if not self._restricted:
                self._restricted = True
                self._restrict()
            self._local.conn = conn
            with self._lock:
                for thread in [t for t in self._all if not t.is_alive()]:
                    _close_quietly(self._all.pop(thread))
                self._all[threading.current_thread()] = conn
        return conn

    def _restrict(self) -> None:
        """chmod 600 the database and its -wal/-shm files where group or others may read."""
        for path in (self.path, self.path.with_name(self.path.name + "-wal"),
                     self.path.with_name(self.path.name + "-shm")):
            try:
                if os.stat(path).st_mode & 0o077:
                    os.chmod(path, 0o600)
            except FileNotFoundError:
                continue
            except OSError as exc:
                LOG.warning("cannot make %s owner-only: %s", path.name, exc.strerror)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def executescript(self, script: str) -> None:
        """Run a schema script in one transaction."""
        with self.transaction() as conn:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def close(self) -> None:
        """Close every connection opened (in any thread); later use raises."""
        with self._lock:
            for conn in self._all.values():
                _close_quietly(conn)
            self._all.clear()
            self._closed = True
        self._local = threading.local()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass
