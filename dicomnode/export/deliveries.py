"""The outbox's records: deliveries (one per destination and object) and their states,
and the database schema they live in (see :mod:`dicomnode.export.outbox`)."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DB_FILENAME = "outbox.sqlite3"
OBJECTS_DIRNAME = "objects"

DEFAULT_BACKOFF_BASE = 10.0
DEFAULT_BACKOFF_MAX = 900.0
DEFAULT_JITTER = 0.25
DEFAULT_BATCH_SIZE = 32

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DeliveryState(enum.StrEnum):
    """Where a delivery stands."""

    PENDING = "pending"
    """Waiting to be sent (again) once ``not_before`` has passed."""
    SENT = "sent"
    """The destination has it."""
    FAILED = "failed"
    """Given up: a permanent error, or a transient one past ``max_attempts`` /
    ``max_age``. Only :meth:`Outbox.retry` sends it again."""

    @classmethod
    def parse(cls, value: DeliveryState | str) -> DeliveryState:
        if isinstance(value, DeliveryState):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(
                f"state: {value!r} is not one of {', '.join(s.value for s in cls)}"
            ) from None


_STATES = ", ".join(f"'{s.value}'" for s in DeliveryState)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS objects (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL REFERENCES objects(sop_instance_uid),
    key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({_STATES})),
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    since REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    last_result TEXT,
    last_error TEXT,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(destination, state, not_before);
CREATE INDEX IF NOT EXISTS deliveries_object ON deliveries(sop_instance_uid, state);
"""

_COLUMNS = (
    "d.id, d.destination, d.sop_instance_uid, o.sop_class_uid, d.key, o.filename, d.state,"
    " d.attempts, d.not_before, d.since, d.created_at, d.updated_at, d.sent_at,"
    " d.last_result, d.last_error"
)
_FROM = "deliveries d JOIN objects o ON o.sop_instance_uid = d.sop_instance_uid"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One object for one destination."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    key: str
    path: Path
    state: DeliveryState
    attempts: int
    not_before: float
    since: float
    created_at: float
    updated_at: float
    sent_at: float | None
    last_result: str | None
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for ``dicomnode outbox --json``)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["state"] = self.state.value
        return out


@dataclass(frozen=True, slots=True)
class _FileInfo:
    source: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int




def _ids(ids: int | Iterable[int]) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]
