"""The retention purge's ledger in the index database: which studies are being purged,
which files each purge still has to delete, and the purge's audit details.

A purge is crash-safe because its first step is ONE index transaction
(:meth:`PurgeLedger.start`) that re-checks the study, records the purge and the files
to delete, and drops the study's rows; the later steps (delete files, audit, mark
purged) are repeated from this ledger after a crash (see :mod:`dicomnode.retention`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dicomnode.core.index import Index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retention_purges (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('purging', 'purged')),
    reason TEXT NOT NULL,
    instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    finished_at REAL,
    patient_id TEXT,
    patient_name TEXT
);
CREATE TABLE IF NOT EXISTS retention_files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('instance', 'result', 'outbox')),
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS retention_files_study ON retention_files(study_uid);
"""


@dataclass(frozen=True, slots=True)
class PurgeMarker:
    """A purge in progress: why, how much, and whom (for its audit event only)."""

    reason: str
    instances: int
    bytes: int
    patient_id: str | None
    patient_name: str | None


@dataclass(frozen=True, slots=True)
class StudyState:
    study_uid: str
    state: str
    revision: int
    last_received: float


class PurgeLedger:
    """Typed access to the purge tables (created in the index database if absent)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        with index.transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        return self.index.connection()

    def in_flight(self) -> list[str]:
        """The studies whose purge was started and not finished, oldest first."""
        return [r[0] for r in self._conn().execute(
            "SELECT study_uid FROM retention_purges WHERE state = 'purging'"
            " ORDER BY started_at")]

    def purged_at(self, study_uid: str) -> float | None:
        """When the study was purged, or None if it never was."""
        row = self._conn().execute(
            "SELECT finished_at FROM retention_purges WHERE study_uid = ? AND state = 'purged'",
            (study_uid,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def marker(self, study_uid: str) -> PurgeMarker:
        row = self._conn().execute(
            "SELECT reason, instances, bytes, patient_id, patient_name FROM retention_purges"
            " WHERE study_uid = ?", (study_uid,)).fetchone()
        if row is None:
            raise KeyError(f"no purge of study {study_uid}")
        return PurgeMarker(str(row[0]), int(row[1]), int(row[2]), row[3], row[4])

    def files(self, study_uid: str) -> list[tuple[str, str]]:
        """(kind, path) of every file the purge of a study still has to delete."""
        return [(r[0], r[1]) for r in self._conn().execute(
            "SELECT kind, path FROM retention_files WHERE study_uid = ? ORDER BY id",
            (study_uid,))]

    def studies(self) -> list[StudyState]:
        """Every study the index holds, with its state, revision and last arrival."""
        return [StudyState(r[0], r[1], int(r[2]), float(r[3])) for r in self._conn().execute(
            "SELECT study_uid, state, revision, last_received FROM studies")]

    def not_handed_off(self) -> set[str]:
        """Studies with a completion not yet handed to routing."""
        return {r[0] for r in self._conn().execute(
            "SELECT DISTINCT study_uid FROM completions WHERE handed_off = 0")}

    def start(self, study_uid: str, revision: int, cutoff: float, reason: str, size: int,
              now: float, patient: tuple[str | None, str | None],
              objects: Sequence[str], folders: Sequence[str]) -> int | str:
        """Step 1 of a purge, atomically: re-check that the study is complete, at
        ``revision``, older than ``cutoff`` and handed off; record the purge and every
        file it must delete; drop the study's rows. Returns the number of instances, or
        why the study is kept (it changed meanwhile)."""
        with self.index.transaction() as conn:
            row = conn.execute(
                "SELECT state, revision, last_received FROM studies WHERE study_uid = ?",
                (study_uid,)).fetchone()
            if (row is None or row[0] != "complete" or int(row[1]) != revision
                    or float(row[2]) >= cutoff):
                return "changed while the purge was being prepared; looked at again next run"
            if conn.execute("SELECT 1 FROM completions WHERE study_uid = ? AND handed_off = 0",
                            (study_uid,)).fetchone() is not None:
                return "its completion has not been handed to routing yet"
            rows = conn.execute("SELECT path FROM instances WHERE study_uid = ?",
                                (study_uid,)).fetchall()
            conn.execute(
                "INSERT OR REPLACE INTO retention_purges (study_uid, state, reason, instances,"
                " bytes, started_at, finished_at, patient_id, patient_name)"
                " VALUES (?, 'purging', ?, ?, ?, ?, NULL, ?, ?)",
                (study_uid, reason, len(rows), size, now, patient[0], patient[1]))
            conn.execute("DELETE FROM retention_files WHERE study_uid = ?", (study_uid,))
            conn.executemany(
                "INSERT INTO retention_files (study_uid, kind, path) VALUES (?, ?, ?)",
                [(study_uid, "outbox", o) for o in objects]
                + [(study_uid, "result", f) for f in folders]
                + [(study_uid, "instance", r[0]) for r in rows])
            conn.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            conn.execute("DELETE FROM completions WHERE study_uid = ?", (study_uid,))
            conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
            conn.execute("DELETE FROM result_sets WHERE study_uid = ?", (study_uid,))
        return len(rows)

    def finish(self, study_uid: str, now: float) -> None:
        """The last step: the files are gone and the purge audited; forget whom."""
        with self.index.transaction() as conn:
            conn.execute("DELETE FROM retention_files WHERE study_uid = ?", (study_uid,))
            conn.execute(
                "UPDATE retention_purges SET state = 'purged', finished_at = ?,"
                " patient_id = NULL, patient_name = NULL WHERE study_uid = ?",
                (now, study_uid))
