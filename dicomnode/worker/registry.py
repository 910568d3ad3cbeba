"""The workers a node has heard from: their heartbeats, kept in the node's jobs database.

Each ``dicomnode worker`` posts a heartbeat every few seconds (its name, host, models, the
job it runs). The node keeps the last one per worker in the table ``workers`` of its jobs
database (beside the queue), so that ``/metrics`` and ``dicomnode status`` (another
process) see the same. A worker is *alive* while its last heartbeat is younger than three
of its own intervals.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.core.db import ThreadLocalSQLite

STALE_AFTER_BEATS = 3.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    address TEXT NOT NULL,
    models TEXT NOT NULL,
    device TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id INTEGER,
    interval REAL NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    jobs_done INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as its last heartbeat described it."""

    name: str
    owner: str
    host: str
    address: str
    models: tuple[str, ...]
    device: str
    version: str
    state: str
    job_id: int | None
    interval: float
    started_at: float
    last_seen: float
    jobs_done: int

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.last_seen)

    def alive(self, now: float | None = None) -> bool:
        return self.age(now) <= STALE_AFTER_BEATS * self.interval

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "address": self.address,
            "models": list(self.models), "device": self.device, "version": self.version,
            "state": self.state if self.alive(now) else "gone", "job_id": self.job_id,
            "last_seen_seconds_ago": round(self.age(now), 1), "jobs_done": self.jobs_done,
            "started_at": self.started_at,
        }


class WorkerRegistry:
    """Heartbeats in the SQLite file ``path`` (the node's jobs database)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = ThreadLocalSQLite(self.path, synchronous="NORMAL")
        self._db.executescript(_SCHEMA)

    def beat(self, *, name: str, owner: str, host: str, address: str, models: list[str],
             device: str, version: str, state: str, job_id: int | None, interval: float,
             started_at: float, jobs_done: int, now: float | None = None) -> WorkerInfo:
        """Record one heartbeat; returns the worker as recorded."""
        at = time.time() if now is None else now
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO workers (name, owner, host, address, models, device, version,"
                " state, job_id, interval, started_at, last_seen, jobs_done)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                " owner=excluded.owner, host=excluded.host, address=excluded.address,"
                " models=excluded.models, device=excluded.device, version=excluded.version,"
                " state=excluded.state, job_id=excluded.job_id, interval=excluded.interval,"
                " started_at=excluded.started_at, last_seen=excluded.last_seen,"
                # the node counts a hand-back as it takes it (handed_back); a heartbeat
                # sent before then must not take it away again, unless the worker restarted
                " jobs_done=CASE WHEN workers.started_at = excluded.started_at"
                " THEN MAX(workers.jobs_done, excluded.jobs_done) ELSE excluded.jobs_done END",
                (name, owner, host, address, json.dumps(sorted(models)), device, version, state,
                 job_id, float(interval), float(started_at), at, int(jobs_done)))
        (done,) = self._db.conn().execute(
            "SELECT jobs_done FROM workers WHERE name = ?", (name,)).fetchone()
        return WorkerInfo(name, owner, host, address, tuple(sorted(models)), device, version,
                          state, job_id, float(interval), float(started_at), at, int(done))

    def handed_back(self, name: str) -> None:
        """The node took a result from worker ``name``: count it now, without waiting for
        the worker's next heartbeat (which reports the same count, or one less)."""
        with self._db.transaction() as conn:
            conn.execute("UPDATE workers SET jobs_done = jobs_done + 1 WHERE name = ?", (name,))

    def list(self) -> list[WorkerInfo]:
        rows = self._db.conn().execute(
            "SELECT name, owner, host, address, models, device, version, state, job_id,"
            " interval, started_at, last_seen, jobs_done FROM workers ORDER BY name").fetchall()
        return [WorkerInfo(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5], r[6], r[7],
                           r[8], float(r[9]), float(r[10]), float(r[11]), int(r[12]))
                for r in rows]

    def close(self) -> None:
        self._db.close()
