"""The SQLite (WAL) index of everything the node holds.

One database file in the storage folder records every stored instance, the state
of every study (receiving / complete, with a revision per completion), the
completions handed to the next stage, and association releases. Several
processes may open it at once (WAL); each thread gets its own connection.

Durability: an instance's file is fsync'd, renamed into place and its folder
fsync'd before its row is committed, so the files are the durable record. The
index runs WAL with ``synchronous=NORMAL``: a commit survives a crash of the
process (kill -9) at once, and after a power loss or OS crash the node reconciles
the index with the files at start-up (``dicomnode.ingest.reconcile``). That saves
an fsync per instance, which on the receive path is the largest single cost.

Audit: an instance row committed with ``audit_pending = 1`` is the durable promise of
its "DICOM Instances Transferred" record: the receiving session clears it once that
record is on disk, and a start-up writes the records of rows a crash left pending
(:meth:`Index.pending_transfers`), so every acknowledged instance gets its record.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.core.attributes import (
    InstanceAttributes,
    instance_values,
    migrate_v2,
    write_attributes,
)
from dicomnode.core.db import ThreadLocalSQLite
from dicomnode.core.layout import JobKey, StorageLayout
from dicomnode.core.records import ResultSet
from dicomnode.core.reports import IndexReports
from dicomnode.core.search import Search, search, withdrawn_among

#: 1: instances, studies, completions, result sets; 2: the QIDO-RS attributes
#: (dicomnode.core.attributes); 3: transfer records owed per instance (audit_pending).
#: Migrated in place, by steps that look at what is there (both 2s of the branches that
#: introduced them upgrade to 3).
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    path TEXT NOT NULL,
    expected_count INTEGER,
    origin TEXT NOT NULL DEFAULT 'received' CHECK (origin IN ('received', 'result')),
    audit_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);

CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
    revision INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    completed_at REAL,
    calling_ae TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS completions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    completed_at REAL NOT NULL,
    reason TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    handed_off INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_uid, revision)
);

CREATE TABLE IF NOT EXISTS result_sets (
    job_key TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    created_at REAL NOT NULL,
    result_set TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS result_sets_study ON result_sets(study_uid);

CREATE TABLE IF NOT EXISTS withdrawn_results (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    withdrawn_at REAL NOT NULL,
    reason TEXT NOT NULL,
    notes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS withdrawn_results_study ON withdrawn_results(study_uid);

CREATE TABLE IF NOT EXISTS association_releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    released_at REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    study_uids TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One row of the instance index."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    size: int
    received_at: float
    path: str
    expected_count: int | None = None
    called_ae: str = ""
    # 'result': an object the node made (SEG, SR, ...), indexed so that QIDO/WADO serve
    # it; results never re-open a study, count towards completion or get routed
    origin: str = "received"
    # what QIDO-RS answers about it, recorded with the row (never read back into a
    # StoredInstance: searches read them in SQL, dicomnode.core.search); None: read
    # later from the file (dicomnode.ingest.reconcile.backfill_attributes)
    attributes: InstanceAttributes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class StoredInstance(InstanceRecord):
    """An instance the index holds (its row, with the row id)."""

    id: int = 0


_INSTANCE_COLUMNS = ("sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax,"
                     " calling_ae, size, received_at, path, expected_count, called_ae, origin, id")


#: leaves out withdrawn results (a condition on the instances table)
_NOT_WITHDRAWN = "sop_instance_uid NOT IN (SELECT sop_instance_uid FROM withdrawn_results)"


def _stored(row: tuple[Any, ...]) -> StoredInstance:
    (sop, sop_class, study, series, syntax, calling, size, received, path, expected, called,
     origin, row_id) = row
    return StoredInstance(sop, sop_class, study, series, syntax, calling, size, received, path,
                          expected, called, origin, id=row_id)


_INSERT = (
    "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid,"
    " transfer_syntax, calling_ae, called_ae, size, received_at, path, expected_count, origin,"
    " audit_pending, instance_number, n_rows, n_columns, n_frames, attributes)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _insert_values(rec: InstanceRecord, origin: str, audit_pending: bool = False
                   ) -> tuple[Any, ...]:
    return (rec.sop_instance_uid, rec.sop_class_uid, rec.study_uid, rec.series_uid,
            rec.transfer_syntax, rec.calling_ae, rec.called_ae, rec.size, rec.received_at,
            rec.path, rec.expected_count, origin, 1 if audit_pending else 0,
            *instance_values(rec.attributes))


@dataclass(frozen=True, slots=True)
class Completion:
    """A study reached completion: handed to the next stage exactly through this."""

    id: int
    study_uid: str
    revision: int
    completed_at: float
    reason: str
    instance_count: int


class Index(IndexReports):
    """Thread-safe access to the index database (one connection per thread)."""

    def __init__(self, path: Path, *, timeout: float = 30.0,
                 synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._db = ThreadLocalSQLite(self.path, synchronous=synchronous,  # type: ignore[arg-type]
                                     timeout=timeout)
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring an older database to :data:`SCHEMA_VERSION` (PRAGMA user_version), in
        one transaction; several processes may race here, the first one migrates. Each
        step checks what the database already has, so it is safe to repeat."""
        with self.transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version >= SCHEMA_VERSION:
                return
            migrate_v2(conn)  # the QIDO-RS attributes (idempotent)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(instances)")}
            if "audit_pending" not in columns:  # transfers were recorded at close only
                conn.execute("ALTER TABLE instances ADD COLUMN audit_pending INTEGER NOT NULL"
                             " DEFAULT 0")
            conn.execute("CREATE INDEX IF NOT EXISTS instances_audit_pending ON"
                         " instances(audit_pending) WHERE audit_pending = 1")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def path_for(storage: Path | str) -> Path:
        """Where the index of the storage folder ``storage`` lives."""
        return StorageLayout(storage).index_db

    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, for the other ledgers of :mod:`dicomnode.core` that
        keep their tables in the index database."""
        return self._db.conn()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        return self._db.transaction()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Raw SQL, for tests and diagnostics only: the node itself uses the typed
        queries below."""
        conn = self._conn()
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.row_factory = None

    def close(self) -> None:
        self._db.close()

    # -- ingest -------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
            .fetchone()
        )
        return row is not None

    def add_instance(self, rec: InstanceRecord, *, audit_pending: bool = False) -> bool:
        """Record a stored instance and mark its study as receiving.

        ``audit_pending``: its transfer record is owed (see the module's docstring).
        Returns False when the SOP Instance UID was already indexed (nothing changes).
        """
        with self.transaction() as conn:
            cur = conn.execute(_INSERT, _insert_values(rec, rec.origin, audit_pending))
            if cur.rowcount == 0:
                return False
            write_attributes(conn, rec.study_uid, rec.series_uid, rec.attributes)
            if rec.origin != "received":
                return True
            conn.execute(
                "INSERT INTO studies (study_uid, state, first_received, last_received, calling_ae)"
                " VALUES (?, 'receiving', ?, ?, ?)"
                " ON CONFLICT(study_uid) DO UPDATE SET state='receiving',"
                " last_received=max(last_received, excluded.last_received)",
                (rec.study_uid, rec.received_at, rec.received_at, rec.calling_ae),
            )
        return True

    def transfers_recorded(self, sop_instance_uids: list[str]) -> None:
        """The transfer records of these instances are on disk: nothing owed any more."""
        with self.transaction() as conn:
            conn.executemany("UPDATE instances SET audit_pending = 0 WHERE sop_instance_uid = ?"
                             " AND audit_pending = 1", [(u,) for u in sop_instance_uids])

    def pending_transfers(self) -> list[StoredInstance]:
        """Instances whose transfer record is still owed (a crash came first), oldest first."""
        rows = self._conn().execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE audit_pending = 1 ORDER BY id")
        return [_stored(r) for r in rows]

    def record_results(self, result_set: ResultSet, instances: list[InstanceRecord]) -> None:
        """Index the objects a job made (origin 'result', so that QIDO-RS/WADO-RS serve
        them; they never re-open a study nor take part in routing) and record its result
        set, in one transaction. Idempotent: a job re-run after a crash changes nothing."""
        with self.transaction() as conn:
            for rec in instances:
                if conn.execute(_INSERT, _insert_values(rec, "result")).rowcount:
                    write_attributes(conn, rec.study_uid, rec.series_uid, rec.attributes)
            conn.execute(
                "INSERT OR REPLACE INTO result_sets (job_key, study_uid, created_at, result_set)"
                " VALUES (?,?,?,?)",
                (result_set.job_key, result_set.study_uid, time.time(),
                 json.dumps(result_set.to_json(), sort_keys=True)))

    def result_set(self, job_key: JobKey | str) -> ResultSet | None:
        """The objects a job made, if it made any."""
        row = self._conn().execute(
            "SELECT result_set FROM result_sets WHERE job_key = ?", (str(job_key),)).fetchone()
        return None if row is None else ResultSet.from_json(json.loads(row[0]))

    def mark_withdrawn(self, study_uid: str, sop_instance_uids: Collection[str], reason: str,
                       notes: Collection[str], at: float | None = None) -> int:
        """Record results as withdrawn (IHE IOCM): QIDO-RS, WADO-RS and the status page
        stop offering them. Already withdrawn ones are kept as they were; returns how
        many were newly withdrawn."""
        now = time.time() if at is None else at
        n = 0
        with self.transaction() as conn:
            for uid in sorted(set(sop_instance_uids)):
                n += conn.execute(
                    "INSERT OR IGNORE INTO withdrawn_results (sop_instance_uid, study_uid,"
                    " withdrawn_at, reason, notes) VALUES (?,?,?,?,?)",
                    (uid, study_uid, now, reason, json.dumps(sorted(notes)))).rowcount
        return n

    def withdrawn(self, study_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs withdrawn (of one study, or all)."""
        if study_uid is None:
            rows = self._conn().execute("SELECT sop_instance_uid FROM withdrawn_results")
        else:
            rows = self._conn().execute(
                "SELECT sop_instance_uid FROM withdrawn_results WHERE study_uid = ?",
                (study_uid,))
        return {r[0] for r in rows}

    def indexed_paths(self) -> set[str]:
        return {r[0] for r in self._conn().execute(
            "SELECT path FROM instances WHERE origin = 'received'")}

    def remove_instances(self, paths: list[str]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM instances WHERE path = ?", [(p,) for p in paths])

    def record_release(self, calling_ae: str, study_uids: list[str]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO association_releases (released_at, calling_ae, study_uids)"
                " VALUES (?,?,?)",
                (time.time(), calling_ae, json.dumps(sorted(study_uids))),
            )

    # -- completion ---------------------------------------------------------

    def new_instances_since(self, last_id: int) -> tuple[int, dict[str, float]]:
        """Studies with instances indexed after row ``last_id``: (new last id, {study: last})."""
        rows = (
            self._conn()
            .execute(
                "SELECT max(id), study_uid, max(received_at) FROM instances WHERE id > ?"
                " AND origin = 'received'"
                " GROUP BY study_uid",
                (last_id,),
            )
            .fetchall()
        )
        top = max((r[0] for r in rows), default=last_id)
        return top, {r[1]: r[2] for r in rows}

    def releases_since(self, last_id: int) -> tuple[int, list[str]]:
        rows = (
            self._conn()
            .execute(
                "SELECT id, study_uids FROM association_releases WHERE id > ? ORDER BY id",
                (last_id,),
            )
            .fetchall()
        )
        top = max((r[0] for r in rows), default=last_id)
        studies: list[str] = []
        for _, uids in rows:
            studies.extend(json.loads(uids))
        return top, studies

    def max_ids(self) -> tuple[int, int]:
        conn = self._conn()
        inst = conn.execute("SELECT coalesce(max(id), 0) FROM instances").fetchone()[0]
        rel = conn.execute("SELECT coalesce(max(id), 0) FROM association_releases").fetchone()[0]
        return int(inst), int(rel)

    def receiving_studies(self) -> dict[str, float]:
        """Studies not yet complete, with the time their last instance arrived."""
        rows = (
            self._conn()
            .execute("SELECT study_uid, last_received FROM studies WHERE state='receiving'")
            .fetchall()
        )
        return {r[0]: r[1] for r in rows}

    def study_progress(self, study_uid: str) -> tuple[int, int | None]:
        """(instances held, largest expected count announced in the headers, if any)."""
        row = (
            self._conn()
            .execute(
                "SELECT count(*), max(expected_count) FROM instances WHERE study_uid = ?"
                " AND origin = 'received'",
                (study_uid,),
            )
            .fetchone()
        )
        return int(row[0]), row[1]

    def complete_study(self, study_uid: str, reason: str) -> Completion | None:
        """Mark the study complete as a new revision, unless it is not receiving.

        Atomic: an instance committed concurrently either counts in this revision or
        re-opens the study afterwards.
        """
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT state, revision FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if row is None or row[0] != "receiving":
                return None
            revision = int(row[1]) + 1
            count = conn.execute(
                "SELECT count(*) FROM instances WHERE study_uid = ? AND origin = 'received'",
                (study_uid,)
            ).fetchone()[0]
            conn.execute(
                "UPDATE studies SET state='complete', revision=?, completed_at=?"
                " WHERE study_uid=?",
                (revision, now, study_uid),
            )
            cur = conn.execute(
                "INSERT INTO completions (study_uid, revision, completed_at, reason,"
                " instance_count) VALUES (?,?,?,?,?)",
                (study_uid, revision, now, reason, count),
            )
            assert cur.lastrowid is not None
            return Completion(cur.lastrowid, study_uid, revision, now, reason, int(count))

    def mark_handed_off(self, completion_id: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE completions SET handed_off=1 WHERE id=?", (completion_id,))

    def pending_handoffs(self) -> list[Completion]:
        rows = (
            self._conn()
            .execute(
                "SELECT id, study_uid, revision, completed_at, reason, instance_count"
                " FROM completions WHERE handed_off=0 ORDER BY id"
            )
            .fetchall()
        )
        return [Completion(*r) for r in rows]

    def study_series(self, study_uid: str) -> dict[str, list[StoredInstance]]:
        """The received instances of a study grouped by series, in arrival order."""
        out: dict[str, list[StoredInstance]] = {}
        for row in self.instances(study_uid=study_uid, origin="received"):
            out.setdefault(row.series_uid, []).append(row)
        return out

    def instances(self, *, study_uid: str | None = None, series_uid: str | None = None,
                  sop_uid: str | None = None, origin: str | None = None,
                  offered: bool = False) -> list[StoredInstance]:
        """The instances matching every criterion given, in arrival order; ``offered``:
        only those the node offers to viewers (withdrawn results left out)."""
        cond: list[str] = [_NOT_WITHDRAWN] if offered else []
        params: list[Any] = []
        for column, value in (("study_uid", study_uid), ("series_uid", series_uid),
                              ("sop_instance_uid", sop_uid), ("origin", origin)):
            if value is not None:
                cond.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(cond)}" if cond else ""
        rows = self._conn().execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances{where} ORDER BY id", params)
        return [_stored(r) for r in rows]

    def study_paths(self, study_uid: str) -> list[str]:
        """The stored paths of every instance of a study (received and results)."""
        return [r[0] for r in self._conn().execute(
            "SELECT path FROM instances WHERE study_uid = ? ORDER BY id", (study_uid,))]

    def last_received(self, study_uid: str) -> float | None:
        """When the study's latest instance arrived, or None for an unknown study."""
        row = self._conn().execute(
            "SELECT last_received FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return None if row is None else float(row[0])

    # -- QIDO-RS ------------------------------------------------------------

    def search(self, query: Search, max_results: int) -> tuple[list[dict[str, Any]], bool]:
        """A QIDO-RS search in SQL (:func:`dicomnode.core.search.search`)."""
        return search(self._conn(), query, max_results)

    def withdrawn_among(self, sop_uids: list[str]) -> set[str]:
        """Which of ``sop_uids`` are results withdrawn by a rejection note (PS3.4 KK)."""
        return withdrawn_among(self._conn(), sop_uids)

    def instances_without_attributes(self, limit: int = 500) -> list[StoredInstance]:
        """Instances whose QIDO-RS attributes were never read (indexed before schema 2,
        or without them), oldest first."""
        rows = self._conn().execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE attributes = 0 ORDER BY id"
            " LIMIT ?", (int(limit),))
        return [_stored(r) for r in rows]

    def set_attributes(self, items: list[tuple[StoredInstance, InstanceAttributes | None]]
                       ) -> None:
        """Record attributes read later (the backfill); None: the file could not be read
        (not tried again)."""
        with self.transaction() as conn:
            for row, attrs in items:
                if attrs is None:
                    conn.execute("UPDATE instances SET attributes = 2 WHERE id = ?", (row.id,))
                    continue
                conn.execute(
                    "UPDATE instances SET instance_number = ?, n_rows = ?, n_columns = ?,"
                    " n_frames = ?, attributes = ? WHERE id = ?",
                    (*instance_values(attrs), row.id))
                write_attributes(conn, row.study_uid, row.series_uid, attrs)
