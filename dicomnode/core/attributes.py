"""The attributes QIDO-RS searches on, kept in the index at admission (PS3.18 10.6).

Ingest reads them once from each received data set (``dicomnode.ingest.header``, in the
same walk that finds the UIDs) and the index stores them beside the instance row:
study attributes (Patient's Name and ID, Study Date/Time, Accession Number...) in
``study_attributes``, series attributes (Modality, Series Number/Description) in
``series_attributes`` (first instance of a study or series wins), instance attributes
(Instance Number, Rows, Columns, Number of Frames) as columns of ``instances``. A search
is then SQL over those tables (:mod:`dicomnode.core.search`), never a read of files.

Values are normalised once, here, for matching (PS3.4 C.2.2.2):

* dates (DA) as ``YYYYMMDD`` (the legacy ``YYYY.MM.DD`` form too), so that string order
  is date order;
* times (TM) also as a key ``HHMMSS.ffffff`` (partial times padded), for range matching;
* person names (PN) also as a key: upper case, each component group without trailing
  ``^``, for case-insensitive (wild card) matching, as PS3.4 C.2.2.2.1 allows for PN.

:data:`SCHEMA_V2` is the migration from schema 1 (run by :class:`~dicomnode.core.index.Index`);
a database that had instances before gets placeholder rows (``complete = 0``) that
``dicomnode.ingest.reconcile.backfill_attributes`` fills from the files.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, NamedTuple

__all__ = ["InstanceAttributes", "SCHEMA_V2", "date_key", "migrate_v2", "pn_key", "time_key",
           "instance_values", "to_int", "write_attributes"]


class InstanceAttributes(NamedTuple):
    """What QIDO-RS answers about one instance, with its study and series (PS3.18
    Tables 10.6.3-3 to 10.6.3-5). Text is decoded (Specific Character Set applied);
    empty means absent. Immutable (a named tuple: made once per received instance, on
    the receive path, where a frozen dataclass costs several times more)."""

    # study level (patient attributes are study attributes in the Study Root model)
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    # series level
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    # instance level
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Any) -> InstanceAttributes:
        """From a pydicom Dataset (the node's own results, files re-indexed)."""
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            if value is None:
                return ""
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                value = "\\".join(str(v) for v in value)
            return str(value).strip()

        def number(keyword: str) -> int | None:
            return to_int(ds.get(keyword))

        return cls(
            patient_name=text("PatientName"), patient_id=text("PatientID"),
            patient_birth_date=date_key(text("PatientBirthDate")),
            patient_sex=text("PatientSex"), study_date=date_key(text("StudyDate")),
            study_time=text("StudyTime"), accession_number=text("AccessionNumber"),
            study_id=text("StudyID"), study_description=text("StudyDescription"),
            referring_physician_name=text("ReferringPhysicianName"),
            modality=text("Modality"), series_number=number("SeriesNumber"),
            series_description=text("SeriesDescription"),
            instance_number=number("InstanceNumber"), rows=number("Rows"),
            columns=number("Columns"), number_of_frames=number("NumberOfFrames"),
        )


def to_int(value: object) -> int | None:
    """An IS/US value as an int, or None (absent or not a number)."""
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip().split("\\")[0])
    except ValueError:
        try:
            return int(float(str(value).strip()))
        except ValueError:
            return None


_DATE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")


def date_key(value: str) -> str:
    """A DA value as ``YYYYMMDD`` (PS3.5 6.2; ``YYYY.MM.DD`` accepted); other text as is."""
    v = value.strip()
    m = _DATE.match(v)
    return "".join(m.groups()) if m else v


def time_key(value: str, *, upper: bool = False) -> str:
    """A TM value as ``HHMMSS.ffffff`` for ordering, or "" when it is not a time.

    Missing components are the start of the period (``"10"`` -> ``100000.000000``), or
    with ``upper`` its end (``"10"`` -> ``105959.999999``): the bounds of a range
    (PS3.4 C.2.2.2.5)."""
    m = _TIME.match(value.strip())
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    fill = "59" if upper else "00"
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return ""
    frac = (frac or "").ljust(6, "9" if upper else "0")
    return f"{hh}{mm or fill}{ss or fill}.{frac}"


def pn_key(value: str) -> str:
    """A Person Name for matching: upper case, each component group (alphabetic,
    ideographic, phonetic; PS3.5 6.2.1) without trailing component separators or
    spaces; trailing empty groups dropped."""
    groups = [g.rstrip("^ ").strip() for g in value.upper().split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


# -- schema ----------------------------------------------------------------------------

SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS study_attributes (
        study_uid TEXT PRIMARY KEY,
        patient_name TEXT NOT NULL DEFAULT '',
        patient_name_key TEXT NOT NULL DEFAULT '',
        patient_id TEXT NOT NULL DEFAULT '',
        patient_birth_date TEXT NOT NULL DEFAULT '',
        patient_sex TEXT NOT NULL DEFAULT '',
        study_date TEXT NOT NULL DEFAULT '',
        study_time TEXT NOT NULL DEFAULT '',
        study_time_key TEXT NOT NULL DEFAULT '',
        accession_number TEXT NOT NULL DEFAULT '',
        study_id TEXT NOT NULL DEFAULT '',
        study_description TEXT NOT NULL DEFAULT '',
        referring_physician_name TEXT NOT NULL DEFAULT '',
        complete INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX IF NOT EXISTS study_attributes_date ON study_attributes(study_date)",
    "CREATE INDEX IF NOT EXISTS study_attributes_patient ON study_attributes(patient_id)",
    "CREATE INDEX IF NOT EXISTS study_attributes_accession"
    " ON study_attributes(accession_number)",
    """CREATE TABLE IF NOT EXISTS series_attributes (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        modality TEXT NOT NULL DEFAULT '',
        series_number INTEGER,
        series_description TEXT NOT NULL DEFAULT '',
        complete INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX IF NOT EXISTS series_attributes_study"
    " ON series_attributes(study_uid, modality)",
    # a study's or series' attributes go with its last instance (purges, withdrawals)
    """CREATE TRIGGER IF NOT EXISTS instances_attributes_gone AFTER DELETE ON instances
    BEGIN
        DELETE FROM series_attributes WHERE series_uid = OLD.series_uid
            AND NOT EXISTS (SELECT 1 FROM instances WHERE series_uid = OLD.series_uid);
        DELETE FROM study_attributes WHERE study_uid = OLD.study_uid
            AND NOT EXISTS (SELECT 1 FROM instances WHERE study_uid = OLD.study_uid);
    END""",
)

#: instance-level columns added to ``instances`` (``attributes``: 1 once read, 0 to do)
INSTANCE_COLUMNS = (("instance_number", "INTEGER"), ("n_rows", "INTEGER"),
                    ("n_columns", "INTEGER"), ("n_frames", "INTEGER"),
                    ("attributes", "INTEGER NOT NULL DEFAULT 0"))


def migrate_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2, inside the caller's transaction: the attribute tables, the instance
    columns, and placeholder rows (``complete = 0``) for what is already indexed."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
    for name, decl in INSTANCE_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE instances ADD COLUMN {name} {decl}")
    for statement in SCHEMA_V2:
        conn.execute(statement)
    conn.execute("INSERT OR IGNORE INTO study_attributes (study_uid, complete)"
                 " SELECT DISTINCT study_uid, 0 FROM instances")
    conn.execute("INSERT OR IGNORE INTO series_attributes (series_uid, study_uid, complete)"
                 " SELECT series_uid, min(study_uid), 0 FROM instances GROUP BY series_uid")


_STUDY_SET = ("patient_name", "patient_name_key", "patient_id", "patient_birth_date",
              "patient_sex", "study_date", "study_time", "study_time_key",
              "accession_number", "study_id", "study_description",
              "referring_physician_name")
_SERIES_SET = ("modality", "series_number", "series_description")


def _upsert(table: str, key: tuple[str, ...], columns: tuple[str, ...]) -> str:
    names = (*key, *columns, "complete")
    updates = ", ".join(f"{c} = excluded.{c}" for c in (*columns, "complete"))
    return (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            f" ON CONFLICT({key[0]}) DO UPDATE SET {updates} WHERE {table}.complete = 0"
            " AND excluded.complete = 1")


_STUDY_UPSERT = _upsert("study_attributes", ("study_uid",), _STUDY_SET)
_SERIES_UPSERT = _upsert("series_attributes", ("series_uid", "study_uid"), _SERIES_SET)


def instance_values(attrs: InstanceAttributes | None) -> tuple[Any, ...]:
    """The instance-level columns of ``instances`` for one row: (instance_number,
    n_rows, n_columns, n_frames, attributes read)."""
    if attrs is None:
        return (None, None, None, None, 0)
    return (attrs.instance_number, attrs.rows, attrs.columns, attrs.number_of_frames, 1)


def write_attributes(conn: sqlite3.Connection, study_uid: str, series_uid: str,
                     attrs: InstanceAttributes | None) -> None:
    """Record an instance's study and series attributes (inside the caller's
    transaction). The first instance of a study or series sets its rows; later ones
    change nothing, except that a placeholder (``complete = 0``) is filled. ``attrs``
    None: a placeholder, filled later by the backfill."""
    done = 1 if attrs is not None else 0
    a = attrs or InstanceAttributes()
    conn.execute(_STUDY_UPSERT, (
        study_uid, a.patient_name, pn_key(a.patient_name), a.patient_id,
        a.patient_birth_date, a.patient_sex, a.study_date, a.study_time,
        time_key(a.study_time), a.accession_number, a.study_id, a.study_description,
        a.referring_physician_name, done))
    conn.execute(_SERIES_UPSERT, (series_uid, study_uid, a.modality, a.series_number,
                                  a.series_description, done))
