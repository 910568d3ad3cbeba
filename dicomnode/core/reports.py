"""What the index holds, summed up: for monitoring (``/metrics``), ``dicomnode status`` and
the status page. A mixin of :class:`dicomnode.core.index.Index`, which provides the
connection."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counts for monitoring: instances per (transfer syntax, calling AE), most first;
    studies per state; completions recorded."""

    instances: list[tuple[str, str, int]]
    studies: dict[str, int]
    completions: int


@dataclass(frozen=True, slots=True)
class StudyOverview:
    """One study as the status page shows it (patient identifiers included: only for
    callers DICOMweb would answer)."""

    study_uid: str
    state: str
    revision: int
    first_received: float
    last_received: float
    completed_at: float | None
    calling_ae: str
    instances: int
    results: int
    series: int
    patient_name: str
    patient_id: str
    study_date: str
    study_description: str
    modalities: str


_OVERVIEW = tuple(StudyOverview.__dataclass_fields__)


class IndexReports:
    """The reporting queries of the index (needs ``_conn()`` and ``query()``)."""

    def _conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        raise NotImplementedError

    def stats(self) -> IndexStats:
        """What the index holds, counted (read at every metrics scrape)."""
        conn = self._conn()
        instances = [(str(ts), str(ae), int(n)) for ts, ae, n in conn.execute(
            "SELECT transfer_syntax, calling_ae, count(*) FROM instances"
            " GROUP BY transfer_syntax, calling_ae ORDER BY count(*) DESC")]
        studies = {str(state): int(n) for state, n in conn.execute(
            "SELECT state, count(*) FROM studies GROUP BY state")}
        completions = int(conn.execute("SELECT count(*) FROM completions").fetchone()[0])
        return IndexStats(instances, studies, completions)

    def recent_studies(self, limit: int = 50) -> list[StudyOverview]:
        """The studies most recently received, newest first, with what the status page
        shows of each."""
        rows = self._conn().execute(
            "SELECT s.study_uid, s.state, s.revision, s.first_received, s.last_received,"
            " s.completed_at, s.calling_ae,"
            " (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid"
            "  AND i.origin = 'received'),"
            " (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid"
            "  AND i.origin = 'result'),"
            " (SELECT count(DISTINCT series_uid) FROM instances i"
            "  WHERE i.study_uid = s.study_uid),"
            " coalesce(a.patient_name, ''), coalesce(a.patient_id, ''),"
            " coalesce(a.study_date, ''), coalesce(a.study_description, ''),"
            " (SELECT group_concat(modality, '/') FROM (SELECT DISTINCT modality"
            "  FROM series_attributes x WHERE x.study_uid = s.study_uid AND modality <> ''"
            "  ORDER BY modality))"
            " FROM studies s LEFT JOIN study_attributes a ON a.study_uid = s.study_uid"
            " ORDER BY s.last_received DESC LIMIT ?", (int(limit),))
        return [StudyOverview(**dict(zip(_OVERVIEW, (*r[:14], r[14] or ""), strict=True)))
                for r in rows]

    def summary(self) -> list[dict[str, Any]]:
        """Every study with its series, counts and state (for ``dicomnode status``)."""
        studies = self.query(
            "SELECT study_uid, state, revision, first_received, last_received, completed_at,"
            " calling_ae FROM studies ORDER BY first_received"
        )
        series_rows = self.query(
            "SELECT study_uid, series_uid, count(*) AS n, sum(size) AS bytes,"
            " group_concat(DISTINCT sop_class_uid) AS classes,"
            " group_concat(DISTINCT transfer_syntax) AS syntaxes"
            " FROM instances GROUP BY study_uid, series_uid ORDER BY min(id)"
        )
        by_study: dict[str, list[dict[str, Any]]] = {}
        for r in series_rows:
            by_study.setdefault(r["study_uid"], []).append(
                {
                    "series_uid": r["series_uid"],
                    "instances": r["n"],
                    "bytes": r["bytes"],
                    "sop_classes": sorted(r["classes"].split(",")),
                    "transfer_syntaxes": sorted(r["syntaxes"].split(",")),
                }
            )
        out = []
        for s in studies:
            series = by_study.get(s["study_uid"], [])
            out.append(
                {
                    "study_uid": s["study_uid"],
                    "state": s["state"],
                    "revision": s["revision"],
                    "calling_ae": s["calling_ae"],
                    "first_received": s["first_received"],
                    "last_received": s["last_received"],
                    "completed_at": s["completed_at"],
                    "instances": sum(x["instances"] for x in series),
                    "series": series,
                }
            )
        return out
