"""The job queue on SQLite (WAL): the back-end of a single-machine node.

The table ``jobs`` may live in the node's index database or in a file of its own;
either way the queue opens its own connections (one per thread) on ``path``.
Several processes may share the file: every write runs in a ``BEGIN IMMEDIATE``
transaction, which takes SQLite's single write lock before reading, so the
select-then-update of :meth:`SQLiteJobQueue.acquire` cannot hand one job to two
owners. ``synchronous=FULL``: a committed state change survives power loss.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dicomnode.core.db import ThreadLocalSQLite
from dicomnode.queue.base import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_JITTER,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_MAX_ATTEMPTS,
    Clock,
    Job,
    JobQueue,
    JobState,
    JobStateError,
    LeaseLostError,
    Priority,
    UnknownJobError,
    check_count,
    check_lease_seconds,
    check_text,
    error_text,
    parse_states,
    to_json,
)

logger = logging.getLogger(__name__)


_STATES = ", ".join(f"'{s.value}'" for s in JobState)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({_STATES})),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
    not_before REAL NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT,
    result TEXT,
    expirations INTEGER NOT NULL DEFAULT 0
);
-- acquire: the runnable jobs (state, not_before <= now), sorted by priority and age;
-- also oldest_pending_age and counts.
CREATE INDEX IF NOT EXISTS jobs_not_before ON jobs(state, not_before);
-- reap_abandoned: the expired leases.
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(state, lease_expires);
"""

_COLUMNS = (
    "id, key, model, payload, priority, state, attempts, max_attempts, not_before,"
    " lease_owner, lease_expires, created_at, updated_at, last_error, result"
)


def _job(row: tuple[Any, ...]) -> Job:
    (
        id_,
        key,
        model,
        payload,
        priority,
        state,
        attempts,
        max_attempts,
        not_before,
        lease_owner,
        lease_expires,
        created_at,
        updated_at,
        last_error,
        result,
    ) = row
    return Job(
        id=int(id_),
        key=key,
        model=model,
        payload=json.loads(payload),
        priority=Priority(priority),
        state=JobState(state),
        attempts=int(attempts),
        max_attempts=int(max_attempts),
        not_before=float(not_before),
        lease_owner=lease_owner,
        lease_expires=None if lease_expires is None else float(lease_expires),
        created_at=float(created_at),
        updated_at=float(updated_at),
        last_error=last_error,
        result=None if result is None else json.loads(result),
    )


class SQLiteJobQueue(JobQueue):
    """:class:`JobQueue` on one SQLite file in WAL mode (table ``jobs``).

    ``path`` may be the node's index database (the table sits beside the index's
    tables) or a file of its own. ``timeout`` is how long a connection waits for
    another writer's lock before giving up with ``sqlite3.OperationalError``.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Clock = time.time,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        rng: random.Random | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(
            clock=clock,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            backoff_jitter=backoff_jitter,
            rng=rng,
        )
        if not isinstance(path, str | Path) or not str(path):
            raise ValueError(f"path: must be a file path, not {path!r}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"path: folder {self.path.parent} does not exist")
        self._db = ThreadLocalSQLite(self.path, synchronous="FULL", timeout=timeout)
        self._db.executescript(_SCHEMA)

    @staticmethod
    def path_for(storage: Path | str) -> Path:
        """Where a queue of its own in the storage folder ``storage`` lives."""
        from dicomnode.core.layout import StorageLayout

        return StorageLayout(storage).jobs_db

    # -- connections ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.transaction()

    @staticmethod
    def _fetch(conn: sqlite3.Connection, job_id: int) -> Job | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def close(self) -> None:
        """Close every connection this queue opened (in any thread)."""
        self._db.close()

    # -- the contract ---------------------------------------------------------

    def add(
        self,
        key: str,
        model: str,
        payload: Mapping[str, Any],
        *,
        priority: Priority | int | str = Priority.ROUTINE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Job:
        check_text("key", key)
        check_text("model", model)
        payload_json = to_json(payload, "payload")
        prio = Priority.parse(priority)
        check_count("max_attempts", max_attempts)
        now = self._now()
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO jobs (key, model, payload, priority, state, attempts, max_attempts,"
                " not_before, created_at, updated_at) VALUES (?,?,?,?,?,0,?,?,?,?)"
                " ON CONFLICT(key) DO NOTHING",
                (
                    key,
                    model,
                    payload_json,
                    int(prio),
                    JobState.PENDING.value,
                    max_attempts,
                    now,
                    now,
                    now,
                ),
            )
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
        job = _job(row)
        if cur.rowcount:
            logger.info("job %d added: %s (model %s, %s)", job.id, key, model, prio.name)
        else:
            logger.debug("job %d already exists for key %s: unchanged", job.id, key)
        return job

    def acquire(self, owner: str, lease_seconds: float, limit: int = 1,
                max_priority: Priority | int | str | None = None) -> builtins.list[Job]:
        check_text("owner", owner)
        lease = check_lease_seconds(lease_seconds)
        check_count("limit", limit)
        top = int(Priority.parse(max_priority) if max_priority is not None else max(Priority))
        now = self._now()
        with self._transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE state = 'pending' AND not_before <= ?"
                    " AND priority <= ? ORDER BY priority, created_at, id LIMIT ?",
                    (now, top, limit),
                )
            ]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            conn.execute(
                f"UPDATE jobs SET state = 'leased', lease_owner = ?, lease_expires = ?,"
                f" attempts = attempts + 1, updated_at = ? WHERE id IN ({marks})",
                (owner, now + lease, now, *ids),
            )
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})"
                " ORDER BY priority, created_at, id",
                ids,
            ).fetchall()
        jobs = [_job(r) for r in rows]
        for job in jobs:
            logger.info(
                "job %d leased to %s for %.0f s (attempt %d of %d)",
                job.id,
                owner,
                lease,
                job.attempts,
                job.max_attempts,
            )
        return jobs

    def extend(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        check_text("owner", owner)
        lease = check_lease_seconds(lease_seconds)
        now = self._now()
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET lease_expires = ?, updated_at = ?"
                " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                (now + lease, now, job_id, owner),
            )
        if not cur.rowcount:
            logger.warning("job %d: %s cannot extend a lease it no longer holds", job_id, owner)
            return False
        return True

    def release(
        self,
        job_id: int,
        owner: str,
        result: Mapping[str, Any] | None = None,
        error: BaseException | str | None = None,
    ) -> Job:
        check_text("owner", owner)
        if result is not None and error is not None:
            raise ValueError("result, error: give one or the other, not both")
        result_json = to_json(result, "result")
        message = None if error is None else error_text(error)
        now = self._now()
        with self._transaction() as conn:
            job = self._fetch(conn, job_id)
            if job is None:
                raise UnknownJobError(job_id)
            if job.state is not JobState.LEASED or job.lease_owner != owner:
                raise LeaseLostError(job_id, owner, job.state, job.lease_owner)
            if message is None:
                conn.execute(
                    "UPDATE jobs SET state = 'done', result = ?, lease_owner = NULL,"
                    " lease_expires = NULL, updated_at = ? WHERE id = ?",
                    (result_json, now, job_id),
                )
            elif job.attempts < job.max_attempts:
                delay = self._backoff(job.attempts)
                conn.execute(
                    "UPDATE jobs SET state = 'pending', not_before = ?, last_error = ?,"
                    " lease_owner = NULL, lease_expires = NULL, updated_at = ? WHERE id = ?",
                    (now + delay, message, now, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET state = 'failed', last_error = ?, lease_owner = NULL,"
                    " lease_expires = NULL, updated_at = ? WHERE id = ?",
                    (message, now, job_id),
                )
            after = self._fetch(conn, job_id)
        assert after is not None
        if after.state is JobState.DONE:
            logger.info("job %d done (attempt %d)", job_id, after.attempts)
        elif after.state is JobState.PENDING:
            logger.warning(
                "job %d attempt %d of %d failed (%s); retry in %.0f s",
                job_id,
                after.attempts,
                after.max_attempts,
                message,
                after.not_before - now,
            )
        else:
            logger.error("job %d failed after %d attempts: %s", job_id, after.attempts, message)
        return after

    def reap_abandoned(self, now: float | None = None) -> int:
        # ``now`` decides which leases count as expired (``inf``: every lease, for a
        # single-node start-up); the rows themselves are stamped with the real time.
        stamp = self._now()
        at = stamp if now is None else float(now)
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, lease_owner, attempts, max_attempts, expirations FROM jobs"
                " WHERE state = 'leased' AND lease_expires <= ?",
                (at,),
            ).fetchall()
            for job_id, holder, attempts, max_attempts, expirations in rows:
                n = int(expirations) + 1
                if attempts >= max_attempts:
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', last_error = ?, expirations = ?,"
                        " lease_owner = NULL, lease_expires = NULL, updated_at = ? WHERE id = ?",
                        (f"lease expired {n} time{'s' if n != 1 else ''}", n, stamp, job_id),
                    )
                    logger.error(
                        "job %d failed: lease of %s expired on its last attempt (%d)",
                        job_id,
                        holder,
                        attempts,
                    )
                else:
                    conn.execute(
                        "UPDATE jobs SET state = 'pending', not_before = ?, last_error = ?,"
                        " expirations = ?, lease_owner = NULL, lease_expires = NULL,"
                        " updated_at = ? WHERE id = ?",
                        (stamp, f"lease of {holder} expired", n, stamp, job_id),
                    )
                    logger.warning(
                        "job %d: lease of %s expired (attempt %d of %d); back to pending",
                        job_id,
                        holder,
                        attempts,
                        max_attempts,
                    )
        return len(rows)

    def get(self, job_id: int) -> Job | None:
        return self._fetch(self._conn(), job_id)

    def list(self, states: Iterable[JobState | str] | None = None) -> builtins.list[Job]:
        wanted = parse_states(states)
        conn = self._conn()
        if wanted is None:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id").fetchall()
        elif not wanted:
            return []
        else:
            marks = ",".join("?" * len(wanted))
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id",
                [s.value for s in wanted],
            ).fetchall()
        return [_job(r) for r in rows]

    def recent(self, limit: int, states: Iterable[JobState | str] | None = None
               ) -> builtins.list[Job]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit: must be an integer >= 0, not {limit!r}")
        wanted = parse_states(states)
        if wanted is not None and not wanted:
            return []
        where, args = "", []
        if wanted is not None:
            where = f" WHERE state IN ({','.join('?' * len(wanted))})"
            args = [s.value for s in wanted]
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM jobs{where} ORDER BY id DESC LIMIT ?", [*args, limit]
        ).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[JobState, int]:
        out = dict.fromkeys(JobState, 0)
        for state, n in self._conn().execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            out[JobState(state)] = int(n)
        return out

    def oldest_pending_age(self) -> float | None:
        row = (
            self._conn()
            .execute("SELECT min(not_before) FROM jobs WHERE state = 'pending'")
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        return max(0.0, self._now() - float(row[0]))

    def retry(self, job_id: int) -> Job:
        now = self._now()
        with self._transaction() as conn:
            job = self._fetch(conn, job_id)
            if job is None:
                raise UnknownJobError(job_id)
            if job.state is not JobState.FAILED:
                raise JobStateError(
                    f"job {job_id}: only a failed job can be retried (it is {job.state.value})"
                )
            conn.execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, expirations = 0,"
                " not_before = ?, result = NULL, updated_at = ? WHERE id = ?",
                (now, now, job_id),
            )
            after = self._fetch(conn, job_id)
        assert after is not None
        logger.info("job %d retried by request (was failed: %s)", job_id, job.last_error)
        return after
