"""The outbox: results on disk, waiting to be delivered, retried until they are.

Layout, under the folder given (the node's storage folder)::

    outbox/outbox.sqlite3          deliveries and objects (WAL, synchronous=FULL)
    outbox/objects/<SOP UID>.dcm   one copy (or hard link) of each object to send

:meth:`Outbox.enqueue` places each file in ``objects/`` (fsync'd, then renamed into
place) and records one *delivery* per (destination, SOP Instance UID). That pair is
unique: enqueueing the same object for the same destination again -- a re-run of a
job, a restart half-way through the pipeline -- changes nothing, and the result UIDs
being deterministic, a re-run's objects are the same objects.

A delivery is ``pending`` (with ``not_before``, when it is next due), ``sent`` or
``failed``. A transient failure goes back to pending after an exponential backoff with
jitter under a ceiling; by default it is retried forever, unless ``max_attempts`` or
``max_age`` say otherwise. A permanent failure is ``failed`` at once, with its reason,
until :meth:`Outbox.retry`. An object's file is removed once every delivery of it is
sent.

:class:`Dispatcher` runs one thread per configured destination (a destination that is
down only delays itself), takes due deliveries in batches, sends them through the
destination's :class:`~dicomnode.export.base.Sender`, records each outcome, and sleeps
until the next delivery is due or something is enqueued. Everything it needs is in the
database and the files: a new Outbox and Dispatcher on the same folder carry on where
the last ones stopped. A delivery interrupted by a crash is still ``pending`` and is
sent again (at least once; peers treat a second copy of a SOP Instance as a duplicate).
"""

from __future__ import annotations

import builtins
import logging
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from dicomnode.core.db import ThreadLocalSQLite
from dicomnode.core.layout import StorageLayout
from dicomnode.core.layout import fsync_dir as _fsync_dir
from dicomnode.core.uids import is_uid
from dicomnode.export.base import DeliveryOutcome, Result
from dicomnode.export.deliveries import (
    _COLUMNS,
    _FROM,
    _NAME_RE,
    _SCHEMA,
    DB_FILENAME,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_BATCH_SIZE,
    DEFAULT_JITTER,
    OBJECTS_DIRNAME,
    Delivery,
    DeliveryState,
    _FileInfo,
    _ids,
)
from dicomnode.queue.base import backoff_delay

LOG = logging.getLogger(__name__)

Clock = Callable[[], float]

class Outbox:
    """The persistent outbox in ``storage_dir/outbox`` (see the module docstring).

    ``clock`` gives the time (seconds since the epoch); ``rng`` draws the jitter.
    A transient failure after ``n`` attempts waits ``backoff_base * 2**(n-1)`` seconds,
    capped at ``backoff_max`` and shortened by a random fraction of at most ``jitter``
    (so the delay lies in ``[d * (1 - jitter), d]``, never above the ceiling).
    ``max_attempts`` / ``max_age`` (seconds since enqueue or the last manual retry):
    give up on transient failures after that many attempts / that long; None (the
    default) retries forever.
    """

    def __init__(
        self,
        storage_dir: Path | str,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        jitter: float = DEFAULT_JITTER,
        max_attempts: int | None = None,
        max_age: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(storage_dir, str | Path) or not str(storage_dir):
            raise ValueError(f"storage_dir: must be a folder path, not {storage_dir!r}")
        if not callable(clock):
            raise ValueError("clock: must be a callable returning seconds")
        if not backoff_base > 0:
            raise ValueError(f"backoff_base: must be positive, not {backoff_base!r}")
        if not backoff_max >= backoff_base:
            raise ValueError(
                f"backoff_max: must be at least backoff_base ({backoff_base}), not {backoff_max!r}"
            )
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), not {jitter!r}")
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
            raise ValueError(f"max_attempts: must be None or a positive int, not {max_attempts!r}")
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age: must be None or positive seconds, not {max_age!r}")
        self.root = StorageLayout(storage_dir).outbox
        self.objects_dir = self.root / OBJECTS_DIRNAME
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_FILENAME
        self.clock = clock
        self.rng = rng or random.Random()
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.jitter = float(jitter)
        self.max_attempts = max_attempts
        self.max_age = None if max_age is None else float(max_age)
        self._db = ThreadLocalSQLite(self.db_path, synchronous="FULL", timeout=timeout)
        self._lock = threading.Lock()  # guards the listeners
        # Held from placing a file to committing its row, and from finding an object
        # fully sent to unlinking its file: the two never interleave in this process.
        self._files_lock = threading.Lock()
        self._rng_lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._db.executescript(_SCHEMA)

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.transaction()

    def close(self) -> None:
        """Close every connection this outbox opened (in any thread)."""
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _row(self, row: tuple[Any, ...]) -> Delivery:
        (id_, dest, sop, sop_class, key, filename, state, attempts, not_before, since,
         created, updated, sent_at, last_result, last_error) = row
        return Delivery(
            id=int(id_),
            destination=dest,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            key=key,
            path=self.objects_dir / filename,
            state=DeliveryState(state),
            attempts=int(attempts),
            not_before=float(not_before),
            since=float(since),
            created_at=float(created),
            updated_at=float(updated),
            sent_at=None if sent_at is None else float(sent_at),
            last_result=last_result,
            last_error=last_error,
        )

    def _select(
        self, conn: sqlite3.Connection, where: str, params: Sequence[Any] = (), tail: str = ""
    ) -> builtins.list[Delivery]:
        sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE {where} {tail}"
        return [self._row(r) for r in conn.execute(sql, tuple(params))]

    # -- listeners -----------------------------------------------------------------------

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(destination)`` after deliveries for it became due
        (enqueue, retry). Used by :class:`Dispatcher` to wake its threads."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _notify(self, destinations: Iterable[str]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for name in sorted(set(destinations)):
            for callback in listeners:
                try:
                    callback(name)
                except Exception:  # a listener must not break enqueue
                    LOG.exception("outbox listener failed for %s", name)

    # -- enqueue ---------------------------------------------------------------------------

    @staticmethod
    def _inspect(path: Path) -> _FileInfo:
        try:
            meta = read_file_meta_info(path)
            sop = str(meta.MediaStorageSOPInstanceUID).strip("\0 ")
            sop_class = str(meta.MediaStorageSOPClassUID).strip("\0 ")
            ts = str(meta.TransferSyntaxUID).strip("\0 ")
            size = path.stat().st_size
        except Exception as exc:
            raise ValueError(f"files: {path} is not a DICOM Part 10 file: {exc}") from None
        for name, uid in (("SOP Instance UID", sop), ("SOP Class UID", sop_class)):
            if not is_uid(uid, strict=True):
                raise ValueError(f"files: {path} has an invalid {name} {uid!r}")
        return _FileInfo(path, sop, sop_class, ts, size)

    def _place(self, info: _FileInfo) -> str:
        """Put the object's file in objects/ (if not there yet); returns its file name."""
        filename = f"{info.sop_instance_uid}.dcm"
        target = self.objects_dir / filename
        if target.exists():
            return filename
        tmp = self.objects_dir / f".{filename}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(info.source, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(info.source, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(self.objects_dir)
        return filename

    def enqueue(
        self, destination: str, files: Iterable[Path | str], key: str = ""
    ) -> builtins.list[Delivery]:
        """Queue ``files`` for ``destination``; returns one delivery per distinct object.

        Every file must be a DICOM Part 10 file (its File Meta Information names the
        SOP Instance UID); otherwise ValueError names it and nothing is queued. An
        object already queued for this destination -- in any state -- is left as it is
        (idempotent: the first copy wins). ``key`` labels the deliveries (e.g. the job
        key) for listings.
        """
        if not isinstance(destination, str) or not _NAME_RE.match(destination):
            raise ValueError(f"destination: {destination!r} is not a destination name")
        if not isinstance(key, str):
            raise ValueError(f"key: must be a string, not {type(key).__name__}")
        infos: dict[str, _FileInfo] = {}
        for raw in files:
            info = self._inspect(Path(raw))
            infos.setdefault(info.sop_instance_uid, info)
        if not infos:
            return []
        now = self.clock()
        added = 0
        marks = ",".join("?" * len(infos))
        with self._files_lock:
            queued = {
                r[0]
                for r in self._conn().execute(
                    "SELECT sop_instance_uid FROM deliveries WHERE destination = ?"
                    f" AND sop_instance_uid IN ({marks})",
                    (destination, *infos),
                )
            }
            # only objects new to this destination need their file (an object already
            # sent everywhere has none any more, and must not get one back)
            names = {uid: self._place(info) for uid, info in infos.items() if uid not in queued}
            with self._transaction() as conn:
                for uid, info in infos.items():
                    if uid not in names:
                        continue
                    conn.execute(
                        "INSERT INTO objects (sop_instance_uid, sop_class_uid, transfer_syntax,"
                        " filename, size, created_at) VALUES (?,?,?,?,?,?)"
                        " ON CONFLICT(sop_instance_uid) DO NOTHING",
                        (uid, info.sop_class_uid, info.transfer_syntax, names[uid], info.size, now),
                    )
                    cur = conn.execute(
                        "INSERT INTO deliveries (destination, sop_instance_uid, key, state,"
                        " attempts, not_before, since, created_at, updated_at)"
                        " VALUES (?,?,?,'pending',0,?,?,?,?)"
                        " ON CONFLICT(destination, sop_instance_uid) DO NOTHING",
                        (destination, uid, key, now, now, now, now),
                    )
                    added += cur.rowcount
                rows = self._select(
                    conn,
                    f"d.destination = ? AND d.sop_instance_uid IN ({marks})",
                    (destination, *infos),
                    "ORDER BY d.id",
                )
        LOG.info(
            "outbox: %d object(s) queued for %s (%d already queued)%s",
            added, destination, len(infos) - added, f" [{key}]" if key else "",
        )
        if added:
            self._notify([destination])
        return rows

    # -- the dispatcher's side --------------------------------------------------------------

    def due(self, destination: str, limit: int = DEFAULT_BATCH_SIZE) -> builtins.list[Delivery]:
        """Pending deliveries for ``destination`` whose time has come, oldest due first."""
        if limit < 1:
            raise ValueError(f"limit: must be positive, not {limit!r}")
        return self._select(
            self._conn(),
            "d.destination = ? AND d.state = 'pending' AND d.not_before <= ?",
            (destination, self.clock(), int(limit)),
            "ORDER BY d.not_before, d.id LIMIT ?",
        )

    def next_due(self, destination: str | None = None) -> float | None:
        """When the next pending delivery (for ``destination``, or any) is due; None if none."""
        sql = "SELECT min(not_before) FROM deliveries WHERE state = 'pending'"
        params: tuple[Any, ...] = ()
        if destination is not None:
            sql += " AND destination = ?"
            params = (destination,)
        row = self._conn().execute(sql, params).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _backoff(self, attempts: int) -> float:
        with self._rng_lock:
            return backoff_delay(
                attempts,
                base=self.backoff_base,
                ceiling=self.backoff_max,
                jitter=self.jitter,
                rng=self.rng,
            )

    def record(self, results: Iterable[tuple[int, DeliveryOutcome]]) -> builtins.list[Delivery]:
        """Record the outcome of sending each delivery (by id), in one transaction.

        ok: sent. permanent: failed, with the reason. transient: pending again after
        the backoff, or failed when ``max_attempts`` / ``max_age`` is reached. Returns
        the deliveries as they are now. Unknown ids, and deliveries no longer pending
        (retried or recorded meanwhile), are left alone.
        """
        items = [(int(i), o) for i, o in results]
        if not items:
            return []
        now = self.clock()
        done_objects: set[str] = set()
        with self._transaction() as conn:
            for delivery_id, outcome in items:
                row = conn.execute(
                    "SELECT attempts, since, state, sop_instance_uid FROM deliveries WHERE id = ?",
                    (delivery_id,),
                ).fetchone()
                if row is None:
                    LOG.warning("outbox: no delivery %d to record an outcome for", delivery_id)
                    continue
                attempts, since, state, sop = int(row[0]) + 1, float(row[1]), row[2], row[3]
                if state != DeliveryState.PENDING.value:
                    LOG.info("outbox: delivery %d is %s; outcome not recorded", delivery_id, state)
                    continue
                result = Result(outcome.result)
                reason = outcome.reason
                if result is Result.OK:
                    conn.execute(
                        "UPDATE deliveries SET state = 'sent', attempts = ?, sent_at = ?,"
                        " updated_at = ?, last_result = 'ok', last_error = ? WHERE id = ?",
                        (attempts, now, now, reason, delivery_id),
                    )
                    done_objects.add(sop)
                    continue
                give_up = None
                if result is Result.PERMANENT:
                    give_up = reason or "permanent failure"
                elif self.max_attempts is not None and attempts >= self.max_attempts:
                    give_up = f"gave up after {attempts} attempts: {reason}"
                elif self.max_age is not None and now - since >= self.max_age:
                    give_up = f"gave up after {now - since:.0f} s: {reason}"
                if give_up is not None:
                    conn.execute(
                        "UPDATE deliveries SET state = 'failed', attempts = ?, updated_at = ?,"
                        " last_result = ?, last_error = ? WHERE id = ?",
                        (attempts, now, result.value, give_up, delivery_id),
                    )
                else:
                    conn.execute(
                        "UPDATE deliveries SET attempts = ?, not_before = ?, updated_at = ?,"
                        " last_result = 'transient', last_error = ? WHERE id = ?",
                        (attempts, now + self._backoff(attempts), now, reason, delivery_id),
                    )
            marks = ",".join("?" * len(items))
            after = self._select(conn, f"d.id IN ({marks})", [i for i, _ in items], "ORDER BY d.id")
        for d in after:
            if d.state is DeliveryState.FAILED and d.updated_at == now:
                LOG.error("outbox: delivery %d of %s to %s failed: %s",
                          d.id, d.sop_instance_uid, d.destination, d.last_error)
        retrying = [d for d in after if d.state is DeliveryState.PENDING and d.updated_at == now]
        if retrying:
            soonest = min(d.not_before for d in retrying) - now
            LOG.warning("outbox: %d deliver%s to %s not sent (%s); next try in %.1f s",
                        len(retrying), "y" if len(retrying) == 1 else "ies",
                        retrying[0].destination, retrying[0].last_error, soonest)
        if done_objects:
            self._remove_sent_objects(done_objects)
        return after

    def mark_sent(self, ids: int | Iterable[int]) -> builtins.list[Delivery]:
        """Record deliveries as sent."""
        return self.record((i, DeliveryOutcome.success(Path())) for i in _ids(ids))

    def mark_failed(
        self, ids: int | Iterable[int], result: Result | str, reason: str
    ) -> builtins.list[Delivery]:
        """Record a failed attempt: ``result`` is ``transient`` (retried after a backoff)
        or ``permanent`` (failed until retried by hand)."""
        kind = Result(result)
        if kind is Result.OK:
            raise ValueError("result: must be 'transient' or 'permanent', not 'ok'")
        return self.record((i, DeliveryOutcome(Path(), kind, reason)) for i in _ids(ids))

    def _remove_sent_objects(self, sops: set[str]) -> None:
        with self._files_lock:
            conn = self._conn()
            for sop in sorted(sops):
                row = conn.execute(
                    "SELECT o.filename, (SELECT count(*) FROM deliveries d WHERE"
                    " d.sop_instance_uid = o.sop_instance_uid AND d.state != 'sent')"
                    " FROM objects o WHERE o.sop_instance_uid = ?",
                    (sop,),
                ).fetchone()
                if row is not None and int(row[1]) == 0:
                    (self.objects_dir / row[0]).unlink(missing_ok=True)

    # -- the operator's side -----------------------------------------------------------------

    def get(self, delivery_id: int) -> Delivery | None:
        rows = self._select(self._conn(), "d.id = ?", (int(delivery_id),))
        return rows[0] if rows else None

    def list(
        self,
        states: Iterable[DeliveryState | str] | DeliveryState | str | None = None,
        *,
        destination: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Delivery]:
        """Deliveries in ``states`` (all when None), of one destination or all, by id."""
        where, params = ["1"], []
        if states is not None:
            if isinstance(states, str | DeliveryState):
                states = [states]
            wanted = sorted({DeliveryState.parse(s).value for s in states})
            if not wanted:
                return []
            where.append(f"d.state IN ({','.join('?' * len(wanted))})")
            params += wanted
        if destination is not None:
            where.append("d.destination = ?")
            params.append(destination)
        tail = "ORDER BY d.id"
        if limit is not None:
            tail += f" LIMIT {int(limit)}"
        return self._select(self._conn(), " AND ".join(where), params, tail)

    def counts(self, destination: str | None = None) -> dict[DeliveryState, int]:
        """How many deliveries are in each state (of one destination, or all)."""
        out = dict.fromkeys(DeliveryState, 0)
        sql = "SELECT state, count(*) FROM deliveries"
        params: tuple[Any, ...] = ()
        if destination is not None:
            sql += " WHERE destination = ?"
            params = (destination,)
        for state, n in self._conn().execute(sql + " GROUP BY state", params):
            out[DeliveryState(state)] = int(n)
        return out

    def summary(self) -> dict[str, dict[DeliveryState, int]]:
        """Counts per destination: ``{destination: {state: n}}``."""
        out: dict[str, dict[DeliveryState, int]] = {}
        for dest, state, n in self._conn().execute(
            "SELECT destination, state, count(*) FROM deliveries GROUP BY destination, state"
        ):
            out.setdefault(dest, dict.fromkeys(DeliveryState, 0))[DeliveryState(state)] = int(n)
        return out

    def retry(
        self, ids: int | Iterable[int] | None = None, *, destination: str | None = None
    ) -> int:
        """Make deliveries due now, with a fresh count of attempts and age.

        ``ids`` None: every failed delivery (of ``destination``, or of all). Given ids
        may be failed or pending (a pending one is tried at once instead of after its
        backoff); sent ones are left alone. Returns how many were changed.
        """
        now = self.clock()
        params: list[Any] = []
        with self._transaction() as conn:
            if ids is None:
                where = "state = 'failed'"
            else:
                wanted = _ids(ids)
                if not wanted:
                    return 0
                where = f"state IN ('failed', 'pending') AND id IN ({','.join('?' * len(wanted))})"
                params = list(wanted)
            if destination is not None:
                where += " AND destination = ?"
                params.append(destination)
            dests = [r[0] for r in conn.execute(
                f"SELECT DISTINCT destination FROM deliveries WHERE {where}", params)]
            cur = conn.execute(
                f"UPDATE deliveries SET state = 'pending', attempts = 0, not_before = ?,"
                f" since = ?, updated_at = ? WHERE {where}",
                (now, now, now, *params),
            )
            changed = cur.rowcount
        if changed:
            LOG.info("outbox: %d deliver%s retried by request", changed,
                     "y" if changed == 1 else "ies")
            self._notify(dests)
        return int(changed)

    def forget_sent(self, before: float) -> int:
        """Delete the records of deliveries sent before ``before`` (epoch seconds).

        After this, enqueueing one of those objects again sends it again: keep the
        records as long as a re-run of the same job may happen.
        """
        with self._transaction() as conn:
            cur = conn.execute(
                "DELETE FROM deliveries WHERE state = 'sent' AND sent_at < ?", (float(before),)
            )
            conn.execute(
                "DELETE FROM objects WHERE sop_instance_uid NOT IN"
                " (SELECT sop_instance_uid FROM deliveries)"
            )
        return int(cur.rowcount)



    # -- withdrawals (dicomnode.withdrawal) ---------------------------------------------------

    def select(
        self,
        *,
        sop_instance_uids: Iterable[str] | None = None,
        key_prefix: str | None = None,
        destination: str | None = None,
    ) -> builtins.list[Delivery]:
        """Deliveries of these objects and/or with keys starting ``key_prefix``, by id."""
        where: builtins.list[str] = ["1"]
        params: builtins.list[Any] = []
        if sop_instance_uids is not None:
            uids = sorted(set(sop_instance_uids))
            if not uids:
                return []
            where.append(f"d.sop_instance_uid IN ({','.join('?' * len(uids))})")
            params += uids
        if key_prefix is not None:
            where.append("substr(d.key, 1, ?) = ?")
            params += [len(key_prefix), key_prefix]
        if destination is not None:
            where.append("d.destination = ?")
            params.append(destination)
        return self._select(self._conn(), " AND ".join(where), params, "ORDER BY d.id")

    def drop(self, ids: int | Iterable[int]) -> int:
        """Delete deliveries that were not sent (pending or failed): they will never be
        sent, nor offered by ``retry``. Sent ones are left alone. Files no longer owed to
        any destination are removed. Returns how many were deleted."""
        wanted = _ids(ids)
        if not wanted:
            return 0
        marks = ",".join("?" * len(wanted))
        with self._files_lock:
            with self._transaction() as conn:
                sops = {r[0] for r in conn.execute(
                    f"SELECT sop_instance_uid FROM deliveries WHERE state != 'sent'"
                    f" AND id IN ({marks})", wanted)}
                cur = conn.execute(
                    f"DELETE FROM deliveries WHERE state != 'sent' AND id IN ({marks})", wanted)
                gone = [r[0] for r in conn.execute(
                    "SELECT filename FROM objects WHERE sop_instance_uid IN"
                    f" ({','.join('?' * len(sops))}) AND sop_instance_uid NOT IN"
                    " (SELECT sop_instance_uid FROM deliveries)", sorted(sops))] if sops else []
                if sops:
                    conn.execute(
                        f"DELETE FROM objects WHERE sop_instance_uid IN ({','.join('?' * len(sops))})"
                        " AND sop_instance_uid NOT IN (SELECT sop_instance_uid FROM deliveries)",
                        sorted(sops))
            for filename in gone:
                (self.objects_dir / filename).unlink(missing_ok=True)
        if cur.rowcount:
            LOG.info("outbox: %d unsent deliver%s dropped", cur.rowcount,
                     "y" if cur.rowcount == 1 else "ies")
        return int(cur.rowcount)
