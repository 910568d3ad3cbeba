"""The job queue for workers on other machines: records in SQLite, hand-offs on Celery/Redis.

Celery is push/ack based (a message is delivered to one worker and acknowledged when it is
done); the queue contract (``base.py``) is lease based. :class:`CeleryJobQueue` keeps both:

* **The job records stay in the node's SQLite** (this class *is* a
  :class:`~dicomnode.queue.sqlite.SQLiteJobQueue`): state, attempts, lease, result and
  error are committed with ``synchronous=FULL`` beside the index, where the audit trail,
  retention, ``dicomnode status`` and the previous-revision lookup read them. Redis (AOF
  ``everysec`` by default) may lose its last second on a crash and may be down for a
  while; the records must not. While Redis is down the node keeps receiving, routing and
  adding jobs; only their hand-offs wait. Workers never touch the records: they reach them
  through the node's worker API, over HTTP, with a worker token.
* **Celery on Redis is the transport** that hands jobs to workers: one message
  (``dicomnode.run_job(job_id, model)``) per runnable job, on a queue per model
  (``dicomnode.<model>``) so that GPU workers are pinned to the models they hold, STAT
  before ROUTINE (message priority 0 and 9 on Redis' priority lists, served in that order
  by every worker), late acknowledgement, reject on worker lost, a visibility timeout
  longer than the worst job, and a prefetch of one. A message only says *which* job; a
  worker turns it into a lease with :meth:`CeleryJobQueue.claim` (through the node), so a
  job runs under one lease at a time whatever the broker delivers twice, and a stale or
  duplicated message is simply dropped by the worker.

Hand-offs (the *dispatcher*): a PENDING job whose ``not_before`` has come needs a message
published at or after that time. ``celery_dispatch.published_at`` records the last one, so
the rule needs no hook in the state transitions: added, backed off after an error, reaped
after its worker died, or retried by an operator, each sets a later ``not_before`` and
makes the job due again. :meth:`dispatch_due` publishes what is due (at once from
:meth:`add`, and from the background thread of :meth:`start`, which also reaps expired
leases and, after an outage and periodically, :meth:`reconcile`-s the broker: a PENDING job
whose message is in no queue and in no worker's hands -- lost with the last second of an
AOF, or a FLUSHALL -- is published again).

The Celery app, the names on the broker and the transport are in ``celery_app.py``
(shared with ``dicomnode worker``).
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomnode.queue.base import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_JITTER,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_MAX_ATTEMPTS,
    Clock,
    Job,
    JobState,
    LeaseLostError,
    Priority,
    UnknownJobError,
    check_lease_seconds,
    check_text,
    error_text,
)
from dicomnode.queue.celery_app import (  # noqa: F401  (re-exported)
    _SEP,
    _TASK_ID,
    _UNACKED,
    _UNACKED_INDEX,
    PRIORITY_STEPS,
    QUEUE_PREFIX,
    TASK_NAME,
    celery_priority,
    make_celery_app,
    queue_name,
    redact_url,
    redis_transport,
    transport_options,
)
from dicomnode.queue.sqlite import _COLUMNS, SQLiteJobQueue, _job

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS celery_dispatch (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    messages INTEGER NOT NULL DEFAULT 0,
    published_at REAL
);
"""


def _job_id_of(task_id: object) -> int | None:
    m = _TASK_ID.match(str(task_id or ""))
    return int(m.group(1)) if m else None


def _message_task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(message, list) and message:  # unacked entries: [message, exchange, key]
        message = message[0]
    headers = message.get("headers") if isinstance(message, dict) else None
    return str(headers.get("id")) if isinstance(headers, dict) else None


class CeleryJobQueue(SQLiteJobQueue):
    """:class:`~dicomnode.queue.base.JobQueue` whose records live in SQLite (``path``) and
    whose runnable jobs are handed to workers through Celery on the Redis broker ``url``.

    Constructing it does not connect: the broker may be down when the node starts.
    """

    def __init__(
        self,
        path: Path | str,
        url: str,
        *,
        visibility_timeout: float = 7200.0,
        clock: Clock = time.time,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        rng: random.Random | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        claim_grace: float = 120.0,
        reconcile_seconds: float = 30.0,
    ) -> None:
        if not isinstance(url, str) or not re.match(r"^rediss?://", url):
            raise ValueError(f"url: must be redis://HOST:PORT/N, not {url!r}")
        check_lease_seconds(visibility_timeout)
        super().__init__(path, clock=clock, backoff_base=backoff_base, backoff_max=backoff_max,
                         backoff_jitter=backoff_jitter, rng=rng, timeout=timeout)
        self._db.executescript(_SCHEMA)
        self.url = url
        self.visibility_timeout = float(visibility_timeout)
        self.claim_grace = float(claim_grace)
        self.reconcile_seconds = float(reconcile_seconds)
        self._connect_timeout = float(connect_timeout)
        self._app: Any = None
        self._redis: Any = None
        self._lock = threading.RLock()  # one publisher at a time (app and client are shared)
        self._broker_up: bool | None = None  # None: not tried yet
        self.broker_error: str | None = None
        self.broker_checked_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reconcile_due = True

    # -- broker plumbing ------------------------------------------------------

    def _celery(self) -> Any:
        if self._app is None:
            self._app = make_celery_app(self.url, visibility_timeout=self.visibility_timeout,
                                        main="dicomnode-node", publisher=True,
                                        connect_timeout=self._connect_timeout)
        return self._app

    def _client(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                self.url, socket_connect_timeout=self._connect_timeout, socket_timeout=10.0)
        return self._redis

    def _broker_ok(self) -> None:
        with self._lock:
            if self._broker_up is False:
                logger.warning("broker %s is reachable again; handing over the jobs that"
                               " waited", redact_url(self.url))
                self._reconcile_due = True
            self._broker_up = True
            self.broker_error = None
            self.broker_checked_at = time.time()

    def _broker_failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._broker_up is not False:
                logger.warning("broker %s unreachable (%s); jobs stay queued in the node and"
                               " are handed over when it is back", redact_url(self.url),
                               error_text(exc))
            self._broker_up = False
            self.broker_error = error_text(exc)
            self.broker_checked_at = time.time()

    @property
    def broker_up(self) -> bool | None:
        """True/False after the last publish or broker read; None before the first."""
        return self._broker_up

    def _publish(self, job_id: int, model: str, priority: int, *, recheck: bool = True) -> bool:
        """One message for ``job_id`` on its model's queue, recorded once Redis took it;
        False when (``recheck``) another thread published it meanwhile."""
        with self._lock:
            if recheck and not self._due(self._now(), job_id):
                return False
            conn = self._conn()
            row = conn.execute("SELECT messages FROM celery_dispatch WHERE job_id = ?",
                               (job_id,)).fetchone()
            n = (int(row[0]) if row else 0) + 1
            self._celery().send_task(
                TASK_NAME, args=(job_id, model), queue=queue_name(model),
                routing_key=queue_name(model), priority=celery_priority(Priority(priority)),
                task_id=f"dicomnode-job-{job_id}-{n}", retry=False, ignore_result=True,
            )
            now = self._now()
            with self._transaction() as tx:
                tx.execute(
                    "INSERT INTO celery_dispatch (job_id, messages, published_at) VALUES (?,?,?)"
                    " ON CONFLICT(job_id) DO UPDATE SET messages = excluded.messages,"
                    " published_at = excluded.published_at", (job_id, n, now))
        logger.info("job %d handed to the broker (queue %s, message %d)", job_id,
                    queue_name(model), n)
        return True

    # -- hand-offs --------------------------------------------------------------

    def _due(self, now: float, job_id: int | None = None) -> list[tuple[int, str, int]]:
        sql = ("SELECT j.id, j.model, j.priority FROM jobs j"
               " LEFT JOIN celery_dispatch d ON d.job_id = j.id"
               " WHERE j.state = 'pending' AND j.not_before <= ?"
               " AND (d.published_at IS NULL OR d.published_at < j.not_before)")
        params: tuple[Any, ...] = (now,)
        if job_id is not None:
            sql += " AND j.id = ?"
            params += (job_id,)
        rows = self._conn().execute(sql + " ORDER BY j.priority, j.created_at, j.id", params)
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def dispatch_due(self, job_id: int | None = None) -> int:
        """Publish a message for every due job (or only ``job_id``); how many were published.

        Stops at the first broker error (the jobs stay due; nothing is lost).
        """
        published = 0
        for jid, model, priority in self._due(self._now(), job_id):
            try:
                sent = self._publish(jid, model, priority)
            except Exception as exc:
                self._broker_failed(exc)
                break
            self._broker_ok()
            published += int(sent)
        return published

    def handoffs_waiting(self) -> int:
        """Runnable jobs that no message was published for yet (e.g. while Redis is down)."""
        return len(self._due(self._now()))

    def _handoff(self, job_id: int | None = None) -> None:
        """Publish at once unless the broker is known to be down (the thread catches up)."""
        if self._broker_up is False and self._thread is not None:
            self._wake.set()
            return
        self.dispatch_due(job_id)

    def reconcile(self, min_age: float = 5.0) -> int:
        """Publish again every runnable PENDING job whose message is gone from the broker.

        A message counts as present while it waits in a queue, or while a worker holds it
        (unacknowledged) for less than ``claim_grace`` seconds; messages published less than
        ``min_age`` seconds ago are left alone (a worker may be popping them right now).
        Returns how many were published again; raises the broker's error.
        """
        now = self._now()
        rows = self._conn().execute(
            "SELECT j.id, j.model, j.priority, d.published_at FROM jobs j"
            " JOIN celery_dispatch d ON d.job_id = j.id"
            " WHERE j.state = 'pending' AND j.not_before <= ? AND d.published_at >= j.not_before"
            " AND d.published_at <= ?", (now, now - min_age)).fetchall()
        if not rows:
            return 0
        client = self._client()
        present: set[int] = set()
        for model in {str(r[1]) for r in rows}:
            for pri in PRIORITY_STEPS:
                key = queue_name(model) + (f"{_SEP}{pri}" if pri else "")
                for raw in client.lrange(key, 0, -1):
                    jid = _job_id_of(_message_task_id(raw))
                    if jid is not None:
                        present.add(jid)
        held_since = {
            (t.decode() if isinstance(t, bytes) else str(t)): float(score)
            for t, score in client.zrange(_UNACKED_INDEX, 0, -1, withscores=True)}
        wall = time.time()
        for tag, raw in client.hgetall(_UNACKED).items():
            tag = tag.decode() if isinstance(tag, bytes) else str(tag)
            jid = _job_id_of(_message_task_id(raw))
            if jid is not None and wall - held_since.get(tag, wall) < self.claim_grace:
                present.add(jid)
        republished = 0
        for jid, model, priority, _published in rows:
            if int(jid) in present:
                continue
            logger.warning("job %d: its message is no longer in the broker; publishing it again",
                           jid)
            republished += int(self._publish(int(jid), str(model), int(priority),
                                             recheck=False))
        return republished

    # -- the contract, with hand-offs -----------------------------------------------

    def add(
        self,
        key: str,
        model: str,
        payload: Mapping[str, Any],
        *,
        priority: Priority | int | str = Priority.ROUTINE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Job:
        job = super().add(key, model, payload, priority=priority, max_attempts=max_attempts)
        if job.state is JobState.PENDING:
            self._handoff(job.id)
        return job

    def reap_abandoned(self, now: float | None = None) -> int:
        reaped = super().reap_abandoned(now)
        if reaped:
            self._handoff()
        return reaped

    def retry(self, job_id: int) -> Job:
        job = super().retry(job_id)
        self._handoff(job.id)
        return job

    # -- what workers do through the node ----------------------------------------------

    def claim(self, job_id: int, owner: str, lease_seconds: float) -> tuple[Job | None, Job | None]:
        """Lease the job ``job_id`` (named by a broker message) to ``owner``.

        Returns ``(leased job, None)``, or ``(None, the job as it is)`` when it is not
        runnable now (leased to another owner, done, failed, or backing off: the message was
        stale and is dropped). Raises :class:`UnknownJobError` if there is no such job.
        """
        check_text("owner", owner)
        lease = check_lease_seconds(lease_seconds)
        now = self._now()
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'leased', lease_owner = ?, lease_expires = ?,"
                " attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? AND state = 'pending' AND not_before <= ?",
                (owner, now + lease, now, job_id, now))
            job = self._fetch(conn, job_id)
        if job is None:
            raise UnknownJobError(job_id)
        if not cur.rowcount:
            return None, job
        logger.info("job %d leased to %s for %.0f s (attempt %d of %d)", job_id, owner, lease,
                    job.attempts, job.max_attempts)
        return job, None

    def fail(self, job_id: int, owner: str, error: BaseException | str) -> Job:
        """End ``owner``'s lease with an error that no retry can cure: FAILED at once."""
        check_text("owner", owner)
        message = error_text(error)
        now = self._now()
        with self._transaction() as conn:
            job = self._fetch(conn, job_id)
            if job is None:
                raise UnknownJobError(job_id)
            if job.state is not JobState.LEASED or job.lease_owner != owner:
                raise LeaseLostError(job_id, owner, job.state, job.lease_owner)
            conn.execute(
                "UPDATE jobs SET state = 'failed', last_error = ?, lease_owner = NULL,"
                " lease_expires = NULL, updated_at = ? WHERE id = ?", (message, now, job_id))
            after = self._fetch(conn, job_id)
        assert after is not None
        logger.error("job %d failed for good: %s", job_id, message)
        return after

    # -- inspection -------------------------------------------------------------------

    def counts_by_model(self) -> dict[str, dict[JobState, int]]:
        """Jobs per model and state (every state present for each model)."""
        out: dict[str, dict[JobState, int]] = {}
        for model, state, n in self._conn().execute(
                "SELECT model, state, count(*) FROM jobs GROUP BY model, state"):
            out.setdefault(str(model), dict.fromkeys(JobState, 0))[JobState(state)] = int(n)
        return out

    def broker_depth(self) -> dict[str, dict[str, int]]:
        """Messages per broker queue: ``{queue: {"stat": n, "routine": n, "unacked": n}}``
        (the queue of every model that has jobs, and any other ``dicomnode.*`` queue).

        Raises the broker's error when it cannot be read.
        """
        client = self._client()
        out: dict[str, dict[str, int]] = {  # every model with jobs, empty queues included
            queue_name(str(m)): {"stat": 0, "routine": 0, "unacked": 0}
            for (m,) in self._conn().execute("SELECT DISTINCT model FROM jobs")}
        for raw in client.scan_iter(match=QUEUE_PREFIX + "*", count=500):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            name, _, pri = key.partition(_SEP)
            kind = "routine" if pri else "stat"
            out.setdefault(name, {"stat": 0, "routine": 0, "unacked": 0})[kind] += int(
                client.llen(key))
        for raw in client.hvals(_UNACKED):
            try:
                entry = json.loads(raw)
                routing_key = str(entry[2])
            except (TypeError, ValueError, IndexError):
                continue
            if routing_key.startswith(QUEUE_PREFIX):
                out.setdefault(routing_key, {"stat": 0, "routine": 0, "unacked": 0})[
                    "unacked"] += 1
        return out

    def list_waiting(self) -> builtins.list[Job]:
        """The PENDING jobs that are runnable now, STAT first (for status output)."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'pending' AND not_before <= ?"
            " ORDER BY priority, created_at, id", (self._now(),)).fetchall()
        return [_job(r) for r in rows]

    # -- the node's background thread ---------------------------------------------------

    def start(self, *, reap: bool = True, interval: float = 1.0) -> None:
        """Hand due jobs to the broker, take back expired leases (``reap``) and reconcile
        the broker, in a background thread, until :meth:`close`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(reap, interval),
                                        name="celery-dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self, reap: bool, interval: float) -> None:
        last_reconcile = 0.0
        while not self._stop.is_set():
            try:
                if reap:
                    super().reap_abandoned()  # the hand-off follows right below
                self.dispatch_due()
                due = self._reconcile_due or time.monotonic() - last_reconcile > \
                    self.reconcile_seconds
                if due and self._broker_up:
                    self.reconcile()
                    self._reconcile_due = False
                    last_reconcile = time.monotonic()
            except Exception as exc:  # the broker (or a locked database) gets another chance
                if self._is_broker_error(exc):
                    self._broker_failed(exc)
                else:
                    logger.exception("job hand-off loop: unexpected error; retrying")
            self._wake.wait(interval)
            self._wake.clear()

    @staticmethod
    def _is_broker_error(exc: BaseException) -> bool:
        try:
            import redis
            from kombu.exceptions import OperationalError
        except ImportError:  # pragma: no cover
            return False
        return isinstance(exc, redis.RedisError | OperationalError | OSError)

    def close(self) -> None:
        """Stop the background thread, release the broker connections, close the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            if self._app is not None:
                try:
                    self._app.close()
                except Exception:  # pragma: no cover - best effort
                    logger.debug("closing the Celery app failed", exc_info=True)
                self._app = None
            if self._redis is not None:
                try:
                    self._redis.close()
                except Exception:  # pragma: no cover
                    logger.debug("closing the Redis client failed", exc_info=True)
                self._redis = None
        super().close()

