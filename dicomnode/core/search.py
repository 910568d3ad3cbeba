"""QIDO-RS searches as SQL over the index's attribute tables (PS3.18 10.6, PS3.4 C.2.2.2).

:func:`search` takes a typed :class:`Search` (level, match keys, the study/series the
URL names, limit and offset) and answers rows of attribute values, filtered, ordered
(arrival order) and paged by SQLite, never by reading files. The matching each key
gets is in :data:`MATCHING`:

* **UID list matching** (C.2.2.2.2): one UID or several separated by ``,`` or ``\\``;
* **single value / wild card matching** (C.2.2.2.1, C.2.2.2.4): ``*`` any run of
  characters, ``?`` one character; case-sensitive, except Person Names and the free-text
  descriptions (Study/Series Description), matched without regard to case;
* **range matching** (C.2.2.2.5) of dates and times: ``A-B``, ``-B``, ``A-`` or one
  value; partial times are the start (lower bound) or the end (upper bound) of their
  period; empty values never match a range;
* **universal matching** (C.2.2.2.3): an empty value, or ``*`` alone, matches all.

A value that cannot be a value of its attribute (a malformed date or range, a UID with
other characters, a non-integer Series Number) raises :class:`SearchError`, which the
DICOMweb side answers with 400.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from dicomnode.core.attributes import pn_key, time_key
from dicomnode.core.uids import is_uid

__all__ = ["Condition", "Level", "MATCHING", "Search", "SearchError", "search",
           "withdrawn_among"]

Level = Literal["study", "series", "instance"]
_RANK = {"study": 0, "series": 1, "instance": 2}
Kind = Literal["uid", "text", "text_ci", "pn", "date", "time", "int", "cs_list", "modalities"]

#: match key -> (its level, the SQL it is matched on, the matching it gets)
MATCHING: dict[str, tuple[Level, str, Kind]] = {
    "StudyInstanceUID": ("study", "st.study_uid", "uid"),
    "PatientName": ("study", "st.patient_name_key", "pn"),
    "PatientID": ("study", "st.patient_id", "text"),
    "PatientBirthDate": ("study", "st.patient_birth_date", "date"),
    "PatientSex": ("study", "st.patient_sex", "text"),
    "StudyDate": ("study", "st.study_date", "date"),
    "StudyTime": ("study", "st.study_time_key", "time"),
    "AccessionNumber": ("study", "st.accession_number", "text"),
    "StudyID": ("study", "st.study_id", "text"),
    "StudyDescription": ("study", "st.study_description", "text_ci"),
    "ReferringPhysicianName": ("study", "st.referring_physician_name", "pn"),
    "ModalitiesInStudy": ("study", "st.study_uid", "modalities"),
    "SeriesInstanceUID": ("series", "se.series_uid", "uid"),
    "Modality": ("series", "se.modality", "cs_list"),
    "SeriesNumber": ("series", "se.series_number", "int"),
    "SeriesDescription": ("series", "se.series_description", "text_ci"),
    "SOPInstanceUID": ("instance", "i.sop_instance_uid", "uid"),
    "SOPClassUID": ("instance", "i.sop_class_uid", "uid"),
    "InstanceNumber": ("instance", "i.instance_number", "int"),
}


class SearchError(ValueError):
    """A match key's value that cannot be applied (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Condition:
    """One match key as the request gave it: the attribute's keyword and its value."""

    keyword: str
    value: str


@dataclass(frozen=True, slots=True)
class Search:
    """One QIDO-RS search: the resource level, its match keys, the study and series the
    URL names (if any), and the page: ``limit`` None for "all" (capped by the caller's
    maximum), ``offset`` results skipped."""

    level: Level
    conditions: tuple[Condition, ...] = ()
    study_uid: str | None = None
    series_uid: str | None = None
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.level not in _RANK:
            raise ValueError(f"level: {self.level!r} is not study, series or instance")
        if self.offset < 0 or (self.limit is not None and self.limit < 0):
            raise ValueError("limit and offset must be >= 0")
        for c in self.conditions:
            if c.keyword not in MATCHING:
                raise ValueError(f"conditions: {c.keyword} is not a supported match key")
            if _RANK[MATCHING[c.keyword][0]] > _RANK[self.level]:
                raise ValueError(f"conditions: {c.keyword} is below the {self.level} level")


_STUDY_COLUMNS = (
    ("StudyInstanceUID", "st.study_uid"), ("PatientName", "st.patient_name"),
    ("PatientID", "st.patient_id"), ("PatientBirthDate", "st.patient_birth_date"),
    ("PatientSex", "st.patient_sex"), ("StudyDate", "st.study_date"),
    ("StudyTime", "st.study_time"), ("AccessionNumber", "st.accession_number"),
    ("StudyID", "st.study_id"), ("StudyDescription", "st.study_description"),
    ("ReferringPhysicianName", "st.referring_physician_name"),
)
_SERIES_COLUMNS = (
    ("SeriesInstanceUID", "se.series_uid"), ("Modality", "se.modality"),
    ("SeriesNumber", "se.series_number"), ("SeriesDescription", "se.series_description"),
)
_INSTANCE_COLUMNS = (
    ("SOPInstanceUID", "i.sop_instance_uid"), ("SOPClassUID", "i.sop_class_uid"),
    ("AvailableTransferSyntaxUID", "i.transfer_syntax"), ("InstanceNumber", "i.instance_number"),
    ("Rows", "i.n_rows"), ("Columns", "i.n_columns"), ("NumberOfFrames", "i.n_frames"),
    ("StudyInstanceUID", "i.study_uid"), ("SeriesInstanceUID", "i.series_uid"),
)
_FROM = {
    "study": "study_attributes st",
    "series": "series_attributes se LEFT JOIN study_attributes st"
              " ON st.study_uid = se.study_uid",
    "instance": "instances i LEFT JOIN series_attributes se ON se.series_uid = i.series_uid"
                " LEFT JOIN study_attributes st ON st.study_uid = i.study_uid",
}
_ORDER = {"study": "st.rowid", "series": "se.rowid", "instance": "i.id"}


#: results withdrawn by an IOCM rejection note (dicomnode.withdrawal) are not offered
_WITHDRAWN = " AND {a}.sop_instance_uid NOT IN (SELECT sop_instance_uid FROM withdrawn_results)"


def _select(level: Level, hide: str) -> list[tuple[str, str]]:
    """The result columns; ``hide`` ("" or :data:`_WITHDRAWN`) filters the counts."""
    x = hide.format(a="x")
    if level == "study":
        modalities = (
            "(SELECT group_concat(modality, '\\') FROM (SELECT DISTINCT modality"
            " FROM series_attributes y WHERE y.study_uid = st.study_uid AND modality <> ''"
            + (" AND EXISTS (SELECT 1 FROM instances x WHERE x.series_uid = y.series_uid"
               f"{x})" if hide else "") + " ORDER BY modality))")
        return [*_STUDY_COLUMNS, ("ModalitiesInStudy", modalities),
                ("NumberOfStudyRelatedSeries",
                 "(SELECT count(DISTINCT series_uid) FROM instances x"
                 f" WHERE x.study_uid = st.study_uid{x})"),
                ("NumberOfStudyRelatedInstances",
                 f"(SELECT count(*) FROM instances x WHERE x.study_uid = st.study_uid{x})")]
    if level == "series":
        return [*_STUDY_COLUMNS[1:], ("StudyInstanceUID", "se.study_uid"), *_SERIES_COLUMNS,
                ("NumberOfSeriesRelatedInstances",
                 f"(SELECT count(*) FROM instances x WHERE x.series_uid = se.series_uid{x})")]
    return [*_STUDY_COLUMNS[1:], *_SERIES_COLUMNS[1:], *_INSTANCE_COLUMNS]


def _offered(level: Level, hide: str) -> str:
    """The condition that leaves out what has no offered instance ("" when nothing is
    withdrawn)."""
    if not hide:
        return ""
    if level == "instance":
        return hide.format(a="i").removeprefix(" AND ")
    key = "study_uid = st.study_uid" if level == "study" else "series_uid = se.series_uid"
    return f"EXISTS (SELECT 1 FROM instances x WHERE x.{key}{hide.format(a='x')})"


def withdrawn_among(conn: sqlite3.Connection, sop_uids: Sequence[str]) -> set[str]:
    """Which of ``sop_uids`` are withdrawn results (never offered by QIDO-RS or WADO-RS)."""
    if not sop_uids or not _has_withdrawals(conn):
        return set()
    out: set[str] = set()
    uids = list(sop_uids)
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out |= {r[0] for r in conn.execute(
            "SELECT sop_instance_uid FROM withdrawn_results WHERE sop_instance_uid IN"
            f" ({','.join('?' * len(chunk))})", chunk)}
    return out


def _has_withdrawals(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                        " AND name = 'withdrawn_results'").fetchone() is not None


def search(conn: sqlite3.Connection, query: Search, max_results: int
           ) -> tuple[list[dict[str, Any]], bool]:
    """The rows ``query`` matches, each a dict keyword -> value (``ModalitiesInStudy`` a
    list; absent values "" or None), in arrival order, from ``query.offset`` on.

    At most ``query.limit`` rows, and never more than ``max_results``; the second value
    says whether more rows match beyond those returned because ``max_results`` cut the
    answer short (PS3.18 8.3.4.4: the caller warns that more can be requested).
    """
    conn.create_function("dn_upper", 1, _upper, deterministic=True)
    conn.create_function("dn_pn", 1, pn_key, deterministic=True)
    where: list[str] = []
    params: list[Any] = []
    if query.study_uid is not None:
        where.append({"study": "st.study_uid", "series": "se.study_uid",
                      "instance": "i.study_uid"}[query.level] + " = ?")
        params.append(query.study_uid)
    if query.series_uid is not None:
        where.append("i.series_uid = ?" if query.level == "instance" else "se.series_uid = ?")
        params.append(query.series_uid)
    for cond in query.conditions:
        _, column, kind = MATCHING[cond.keyword]
        if query.level == "instance" and column.startswith(("st.study_uid", "se.series_uid")):
            column = "i." + column.split(".", 1)[1]  # the indexed column of instances
        sql = _condition(cond, column, kind, params)
        if sql:
            where.append(sql)
    hide = _WITHDRAWN if _has_withdrawals(conn) else ""
    if hide:
        where.append(_offered(query.level, hide))
    wanted = max_results if query.limit is None else min(query.limit, max_results)
    columns = _select(query.level, hide)
    sql = (f"SELECT {', '.join(expr for _, expr in columns)} FROM {_FROM[query.level]}"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY {_ORDER[query.level]} LIMIT ? OFFSET ?")
    rows = conn.execute(sql, (*params, wanted + 1, query.offset)).fetchall()
    more = len(rows) > wanted and (query.limit is None or query.limit > max_results)
    out = []
    for row in rows[:wanted]:
        item = {name: value for (name, _), value in zip(columns, row, strict=True)}
        if "ModalitiesInStudy" in item:
            item["ModalitiesInStudy"] = [m for m in (item["ModalitiesInStudy"] or "")
                                         .split("\\") if m]
        out.append(item)
    return out, more


def _upper(value: object) -> str:
    return str(value or "").upper()


def _glob(pattern: str) -> str:
    """A DICOM wild card pattern as a GLOB pattern: ``*`` and ``?`` kept, ``[`` literal."""
    return pattern.replace("[", "[[]")


def _is_wild(value: str) -> bool:
    return "*" in value or "?" in value


def _condition(cond: Condition, column: str, kind: Kind, params: list[Any]) -> str:
    """The SQL of one match key (its parameters appended to ``params``); "" for universal
    matching. Raises SearchError for a value its attribute cannot have."""
    value = cond.value.strip()
    if value in ("", "*"):
        return ""
    name = cond.keyword
    if kind == "uid":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        if not uids or not all(is_uid(u) for u in uids):
            raise SearchError(f"{name}: {value!r} is not a UID or a list of UIDs")
        params.extend(uids)
        return f"{column} IN ({','.join('?' * len(uids))})"
    if kind == "pn":
        # case-insensitive, on the normalised name (PS3.4 C.2.2.2.1 allows it for PN);
        # a name matches on its alphabetic group, or whole
        pattern = _glob(pn_key(value))
        target = column if column.endswith("_key") else f"dn_pn({column})"
        params.extend([pattern, pattern + "=*"])
        return f"({target} GLOB ? OR {target} GLOB ?)"
    if kind in ("text", "text_ci"):
        target = f"dn_upper({column})" if kind == "text_ci" else column
        folded = value.upper() if kind == "text_ci" else value
        if _is_wild(value):
            params.append(_glob(folded))
            return f"{target} GLOB ?"
        params.append(folded)
        return f"{target} = ?"
    if kind in ("cs_list", "modalities"):
        values = [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]
        if not values:
            return ""
        parts = []
        for v in values:
            parts.append("modality GLOB ?" if _is_wild(v) else "modality = ?")
            params.append(_glob(v) if _is_wild(v) else v)
        if kind == "modalities":
            return ("EXISTS (SELECT 1 FROM series_attributes x WHERE x.study_uid = st.study_uid"
                    f" AND ({' OR '.join(parts)}))")
        return "(" + " OR ".join(p.replace("modality", column) for p in parts) + ")"
    if kind == "int":
        try:
            params.append(int(value))
        except ValueError:
            raise SearchError(f"{name}: {value!r} is not an integer") from None
        return f"{column} = ?"
    if kind == "date":
        return _range(name, value, column, params, _date_bound)
    return _range(name, value, column, params, _time_bound)


def _date_bound(value: str, upper: bool) -> str:
    v = value.strip()
    if not re.fullmatch(r"\d{8}", v):
        raise ValueError(v)
    date(int(v[:4]), int(v[4:6]), int(v[6:]))  # a real date, or ValueError
    return v


def _time_bound(value: str, upper: bool) -> str:
    key = time_key(value, upper=upper)
    if not key:
        raise ValueError(value)
    return key


def _range(name: str, value: str, column: str, params: list[Any], bound: Any) -> str:
    """Single value or range matching of a DA or TM value (PS3.4 C.2.2.2.5)."""
    what = "date" if bound is _date_bound else "time"
    parts = value.split("-")
    try:
        if len(parts) == 1:
            lo, hi = bound(value, False), bound(value, True)
            if lo == hi:
                params.append(lo)
                return f"{column} = ?"
            params.extend([lo, hi])
            return f"({column} <> '' AND {column} BETWEEN ? AND ?)"
        if len(parts) != 2 or not (parts[0] or parts[1]):
            raise ValueError(value)
        lo = bound(parts[0], False) if parts[0] else None
        hi = bound(parts[1], True) if parts[1] else None
    except ValueError:
        raise SearchError(f"{name}: {value!r} is not a {what} or a {what} range"
                          f" ({'YYYYMMDD' if what == 'date' else 'HHMMSS'}, A-B, -B or A-)"
                          ) from None
    if lo is not None and hi is not None and lo > hi:
        raise SearchError(f"{name}: the range {value!r} ends before it starts")
    sql = [f"{column} <> ''"]
    if lo is not None:
        sql.append(f"{column} >= ?")
        params.append(lo)
    if hi is not None:
        sql.append(f"{column} <= ?")
        params.append(hi)
    return "(" + " AND ".join(sql) + ")"


def keywords_at(level: Level) -> Sequence[str]:
    """The match keys a search at ``level`` can apply."""
    return [k for k, (lv, _, _) in MATCHING.items() if _RANK[lv] <= _RANK[level]]
