"""Withdrawing results: rejection notes to every destination that received them (IHE IOCM).

Two ways in, one path:

* **a revision replaces results** (a late instance re-opened the study): the flow calls
  :func:`withdraw` with the SOP Instance UIDs the new result set replaces and, per
  destination, the UIDs of the new results queued for it (``after``);
* **by hand**: ``dicomnode results withdraw STUDY [--model NAME] --reason TEXT`` calls
  :func:`withdraw` with ``replaced=None`` (every result of the study, or of one model)
  and a user.

What happens:

1. The outbox knows what went where: each destination's deliveries of the withdrawn
   objects are split into *received* (sent, or attempted at least once: a transfer
   cut off mid-way may still have been stored) and *never sent*.
2. Deliveries not sent are dropped from the outbox (:meth:`Outbox.drop`): withdrawn
   results are never sent afterwards, nor offered by ``outbox --retry``.
3. Each destination that received something gets one rejection note
   (:func:`dicomnode.encode.kos.encode_rejection_note`, title CID 7011, "Rejected for
   Quality Reasons" by default) referencing exactly what it received, checked (read
   back, dciodvfy) and written once under ``<storage>/withdrawals/``; its UIDs derive
   from the destination and the rejected set, so doing it again changes nothing.
4. The note is handed to the :class:`RejectionGate`, which queues it in the same
   outbox (retries, backoff, one delivery per destination and UID) only once the new
   results ``after`` it are sent to that destination, so an archive never hides the old
   results before it holds the new ones.
5. The withdrawn instances are recorded in the index (``Index.mark_withdrawn``) so
   that QIDO-RS / WADO-RS and the status page stop offering them, and the withdrawal
   is audited (:func:`dicomnode.audit.withdrawal.results_withdrawn`).

Bad input changes nothing: an unknown study, results that were never sent anywhere,
or results already withdrawn raise :class:`WithdrawalError` before anything is
written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.core.db import ThreadLocalSQLite
from dicomnode.core.index import Index, StoredInstance
from dicomnode.encode.kos import (
    QUALITY,
    ModelIdentity,
    RejectedInstance,
    encode_rejection_note,
    rejection_note_uids,
)
from dicomnode.encode.validate import ensure_valid
from dicomnode.errors import DicomNodeError
from dicomnode.export.deliveries import Delivery, DeliveryState
from dicomnode.export.outbox import Outbox

LOG = logging.getLogger(__name__)

WITHDRAWALS_DIRNAME = "withdrawals"
GATE_DB = "gate.sqlite3"


class WithdrawalError(DicomNodeError):
    """A withdrawal that cannot be done (unknown study, nothing sent, already withdrawn)."""


# -- the gate: notes wait for the new results ------------------------------------------------

_GATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS held_notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    note_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    key TEXT NOT NULL,
    after TEXT NOT NULL,
    created_at REAL NOT NULL,
    released_at REAL,
    UNIQUE (destination, note_uid)
)
"""


class RejectionGate:
    """Holds each rejection note until the results it follows are sent, then queues it.

    One SQLite file (``<storage>/withdrawals/gate.sqlite3``); a note held when the node
    stops is released by the next :meth:`release` after a restart. A note is released
    once every SOP Instance UID in its ``after`` set is sent to its destination (or is
    not in the outbox for it at all: nothing to wait for).
    """

    def __init__(self, storage_dir: Path | str) -> None:
        self.root = Path(storage_dir) / WITHDRAWALS_DIRNAME
        self._opened: ThreadLocalSQLite | None = None
        self._lock = threading.Lock()

    @property
    def _db(self) -> ThreadLocalSQLite:
        """The database, created on first use (a gate never used leaves no trace)."""
        if self._opened is None:
            self.root.mkdir(parents=True, exist_ok=True)
            db = ThreadLocalSQLite(self.root / GATE_DB, synchronous="FULL")
            db.executescript(_GATE_SCHEMA)
            self._opened = db
        return self._opened

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def hold(self, destination: str, note: Path, after: Collection[str], key: str) -> None:
        """Hold ``note`` (a Part 10 file) for ``destination`` until ``after`` is sent."""
        uid = pydicom.dcmread(note, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO held_notes (destination, note_uid, path, key, after, created_at)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT(destination, note_uid) DO NOTHING",
                (destination, str(uid.SOPInstanceUID), str(note), key,
                 json.dumps(sorted(set(after))), now))

    def held(self, destination: str | None = None) -> list[tuple[str, str, list[str]]]:
        """(destination, note UID, UIDs still awaited) of every note not released yet."""
        sql = "SELECT destination, note_uid, after FROM held_notes WHERE released_at IS NULL"
        params: tuple[str, ...] = ()
        if destination is not None:
            sql += " AND destination = ?"
            params = (destination,)
        return [(d, n, json.loads(a)) for d, n, a in self._db.conn().execute(sql, params)]

    def release(self, outbox: Outbox, destination: str | None = None) -> int:
        """Queue every held note whose results are sent; returns how many were queued.

        Safe to call often (after each dispatcher batch) and from several threads.
        """
        released = 0
        if self._opened is None and not (self.root / GATE_DB).exists():
            return 0
        with self._lock:
            rows = list(self._db.conn().execute(
                "SELECT id, destination, path, key, after FROM held_notes"
                " WHERE released_at IS NULL" + (" AND destination = ?" if destination else "")
                + " ORDER BY id", (destination,) if destination else ()))
            for row_id, dest, path, key, after in rows:
                wanted = json.loads(after)
                if wanted:
                    states = {d.sop_instance_uid: d.state
                              for d in outbox.select(sop_instance_uids=wanted, destination=dest)}
                    waiting = [u for u, s in states.items() if s is not DeliveryState.SENT]
                    if waiting:
                        continue
                outbox.enqueue(dest, [Path(path)], key=key)
                with self._db.transaction() as conn:
                    conn.execute("UPDATE held_notes SET released_at = ? WHERE id = ?",
                                 (time.time(), row_id))
                released += 1
                LOG.info("rejection note queued for %s after its results were sent", dest)
        return released


# -- the withdrawal ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationWithdrawal:
    """What one destination gets: a note referencing ``rejected`` (what it received),
    and ``dropped`` deliveries that will never be sent."""

    destination: str
    rejected: tuple[RejectedInstance, ...]
    dropped: int
    note_uid: str | None
    note_path: Path | None


@dataclass(frozen=True)
class WithdrawalReport:
    """The outcome of :func:`withdraw`."""

    study_uid: str
    withdrawn: tuple[str, ...]
    destinations: tuple[DestinationWithdrawal, ...] = field(default=())

    @property
    def notes(self) -> list[str]:
        return [d.note_uid for d in self.destinations if d.note_uid]


def _received(d: Delivery) -> bool:
    """Whether the destination may hold the object: sent, or tried at least once."""
    return d.state is DeliveryState.SENT or d.attempts > 0


def _describe(rows: list[StoredInstance], uid: str, outbox: Outbox
              ) -> tuple[RejectedInstance, Path | None]:
    """Study/series/class of a result from its index row, else from the outbox's file."""
    for row in rows:
        if row.sop_instance_uid == uid:
            return (RejectedInstance(row.study_uid, row.series_uid, row.sop_class_uid, uid),
                    Path(row.path))
    for d in outbox.select(sop_instance_uids=[uid]):
        if d.path.is_file():
            ds = pydicom.dcmread(d.path, stop_before_pixels=True)
            return RejectedInstance.from_dataset(ds), d.path
    raise WithdrawalError(f"result {uid} is neither in the index nor in the outbox: its series"
                          " is unknown, so no rejection note can reference it")


def _header(storage: Path, paths: list[Path | None], index: Index, study_uid: str) -> Dataset:
    candidates = [p if p is None or p.is_absolute() else storage / p for p in paths]
    candidates += [storage / p for p in index.study_paths(study_uid)[:5]]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                return pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - try the next one
                LOG.debug("cannot read a header of study %s from %s", study_uid, path.name)
    raise WithdrawalError(f"study {study_uid}: no readable instance or result left for the"
                          " patient and study attributes of a rejection note")


def _write_note(ds: Dataset, folder: Path) -> Path:
    """Write a note once, checked (read back + dciodvfy) before it gets its final name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    try:
        ensure_valid(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def withdraw(
    *,
    storage: Path | str,
    outbox: Outbox,
    index: Index,
    gate: RejectionGate,
    study_uid: str,
    reason: str,
    replaced: Collection[str] | None = None,
    model: str | None = None,
    after: Mapping[str, Collection[str]] | None = None,
    identity: ModelIdentity | None = None,
    title: Code = QUALITY,
    user: str | None = None,
    audit: Audit | None = None,
) -> WithdrawalReport:
    """Withdraw results of ``study_uid`` from every destination that received them.

    ``replaced``: the SOP Instance UIDs to withdraw (a revision's replaced results);
    None withdraws every result of the study the outbox ever queued (only those of
    ``model`` when given). ``after``: per destination, the new results its note must
    follow. ``reason`` is the note's Key Object Description and the audit's outcome
    description. See the module docstring for the steps and the errors.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise WithdrawalError("a reason is required (it is written into the rejection note)")
    storage = Path(storage)
    results = index.instances(study_uid=study_uid, origin="result")
    known = bool(results) or index.last_received(study_uid) is not None
    if replaced is None:
        deliveries = [d for d in outbox.select(key_prefix=f"{study_uid}/")
                      if d.key != note_key(study_uid)]
        if model is not None:
            deliveries = [d for d in deliveries if d.key.rsplit("/", 1)[-1] == model]
        if not known and not deliveries:
            raise WithdrawalError(f"unknown study {study_uid}: the node holds nothing of it")
    else:
        deliveries = outbox.select(sop_instance_uids=replaced) if replaced else []
    already = index.withdrawn(study_uid)
    deliveries = [d for d in deliveries if d.sop_instance_uid not in already]
    received = [d for d in deliveries if _received(d)]
    if replaced is None and not received:
        what = f"results of {model}" if model else "results"
        if any(d.sop_instance_uid in already for d in outbox.select(key_prefix=f"{study_uid}/")):
            raise WithdrawalError(f"study {study_uid}: its {what} are already withdrawn")
        raise WithdrawalError(f"study {study_uid}: its {what} were never sent to any destination;"
                              " nothing to withdraw")
    plan: dict[str, list[RejectedInstance]] = {}
    paths: list[Path | None] = []
    for d in received:
        ref, path = _describe(results, d.sop_instance_uid, outbox)
        if ref.study_uid != study_uid:
            raise WithdrawalError(f"result {d.sop_instance_uid} belongs to study {ref.study_uid},"
                                  f" not {study_uid}")
        plan.setdefault(d.destination, []).append(ref)
        paths.append(path)
    header = _header(storage, paths, index, study_uid) if plan else None
    folder = storage / WITHDRAWALS_DIRNAME / "notes"
    outcome: list[DestinationWithdrawal] = []
    for destination in sorted({d.destination for d in deliveries}):
        refs = plan.get(destination, [])
        unsent = [d.id for d in deliveries if d.destination == destination
                  and d.state is not DeliveryState.SENT]
        note_uid = note_path = None
        if refs:
            assert header is not None
            note = encode_rejection_note(refs, header, destination=destination, title=title,
                                         identity=identity, description=reason.strip())
            note_path = _write_note(note, folder)
            note_uid = str(note.SOPInstanceUID)
            gate.hold(destination, note_path, (after or {}).get(destination, ()),
                      key=note_key(study_uid))
        dropped = outbox.drop(unsent) if unsent else 0
        outcome.append(DestinationWithdrawal(destination, tuple(refs), dropped, note_uid,
                                             note_path))
    withdrawn = sorted({d.sop_instance_uid for d in deliveries} | set(replaced or ()))
    withdrawn = [u for u in withdrawn if u not in already]
    notes = [o.note_uid for o in outcome if o.note_uid]
    index.mark_withdrawn(study_uid, withdrawn, reason.strip(), notes)
    gate.release(outbox)
    classes: dict[str, int] = {}
    for refs in plan.values():
        for r in refs:
            classes[r.sop_class_uid] = classes.get(r.sop_class_uid, 0) + 1
    from dicomnode.audit.withdrawal import results_withdrawn

    (audit or NullAudit()).record(results_withdrawn, study_uid, classes,
                                  [o.destination for o in outcome if o.note_uid],
                                  reason.strip(), user)
    LOG.info("study %s: %d result(s) withdrawn; rejection notes for %d destination(s)",
             study_uid, len(withdrawn), len(notes))
    return WithdrawalReport(study_uid, tuple(withdrawn), tuple(outcome))


def note_key(study_uid: str) -> str:
    """The outbox key of a study's rejection notes (job keys are ``study/revision/...``,
    so the dispatcher's per-study audit still finds the study)."""
    return f"{study_uid}/withdraw"


def expected_note_uid(destination: str, rejected: Collection[RejectedInstance],
                      title: Code = QUALITY) -> str:
    """The SOP Instance UID the note for ``destination`` and ``rejected`` has (or will have)."""
    return rejection_note_uids(destination, title, rejected)[1]
