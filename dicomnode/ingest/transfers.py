"""Recording the instances a session brings as it acknowledges them (PS3.15 A.5.3.7).

A "DICOM Instances Transferred" record per study says which instances arrived, from
whom. Writing one per association at its close left the instances acknowledged before
a crash without any record; recording each instance before its Success would cost an
audit fsync per instance. So:

* each instance's index row is committed with ``audit_pending = 1`` before the door
  answers Success: the durable promise of its record (:mod:`dicomnode.core.index`);
* :class:`TransferLedger` tallies what a session stored per study and writes a record
  of the instances not yet covered every :data:`RECORD_EVERY` instances or
  :data:`RECORD_SECONDS` after the oldest uncovered one, and at the session's end;
  the instance that makes a record due is answered only once that record is on disk;
* once a record is on disk its instances' rows are cleared;
* a start-up writes the records still owed (:func:`record_pending_transfers`), so after
  ``kill -9`` mid-association every acknowledged instance has its record.

The group commit of the trail stays intact: one audit fsync per :data:`RECORD_EVERY`
instances of a session (shared with every other record of the moment), not one each.
Nothing here logs a patient identifier: they go only into the encrypted records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.audit.recorder import Audit, RecordNotDurable
from dicomnode.core.index import Index, StoredInstance

LOG = logging.getLogger(__name__)

#: A record of the instances not yet covered after this many of them ...
RECORD_EVERY = 50
#: ... or this many seconds after the oldest of them, whichever comes first.
RECORD_SECONDS = 2.0


@dataclass
class StudyTally:
    """What a session brought of one study; the counters hold what no record covers yet."""

    patient_id: str
    patient_name: str
    sop_classes: Counter[str] = field(default_factory=Counter)
    sop_uids: list[str] = field(default_factory=list)
    failed: int = 0
    recorded: int = 0  # instances covered by records written so far


class TransferLedger:
    """The per-study tallies of one session, and their records."""

    def __init__(self, audit: Audit, index: Index, calling_ae: str, address: str | None,
                 node_ae: str, *, every: int = RECORD_EVERY, seconds: float = RECORD_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every: must be an integer >= 1, not {every!r}")
        if not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"seconds: must be >= 0, not {seconds!r}")
        self.audit = audit
        self.index = index
        self.calling_ae = calling_ae
        self.address = address
        self.node_ae = node_ae
        self.every = every
        self.seconds = float(seconds)
        self.clock = clock
        self.studies: dict[str, StudyTally] = {}
        self._uncovered = 0
        self._oldest = 0.0

    def tally(self, study_uid: str, patient_id: str, patient_name: str) -> StudyTally:
        t = self.studies.get(study_uid)
        if t is None:
            t = self.studies[study_uid] = StudyTally(patient_id, patient_name)
        return t

    def stored(self, study_uid: str, patient_id: str, patient_name: str, sop_class: str,
               sop_uid: str) -> None:
        t = self.tally(study_uid, patient_id, patient_name)
        t.sop_classes[sop_class] += 1
        t.sop_uids.append(sop_uid)
        if not self._uncovered:
            self._oldest = self.clock()
        self._uncovered += 1

    def failed(self, study_uid: str, patient_id: str, patient_name: str) -> None:
        self.tally(study_uid, patient_id, patient_name).failed += 1

    @property
    def due(self) -> bool:
        """A record is due: enough instances, or the oldest uncovered one old enough."""
        return self._uncovered >= self.every or (
            self._uncovered > 0 and self.clock() - self._oldest >= self.seconds)

    def record(self, *, wait: bool = True) -> None:
        """One record per study with instances (or failures) no record covers yet.

        ``wait``: return only once they are on disk. Raises :class:`RecordNotDurable`
        when the trail cannot be written: a record it held is written later (and its
        instances' rows cleared then); one it did not take stays owed here.
        """
        from dicomnode.audit import events

        for study_uid, t in self.studies.items():
            if not t.sop_uids and not t.failed:
                continue
            uids, classes, failed = t.sop_uids, t.sop_classes, t.failed
            t.sop_uids, t.sop_classes, t.failed = [], Counter(), 0
            self._uncovered -= len(uids)
            try:
                self.audit.record_durably(
                    events.instances_received, self.calling_ae, self.address, self.node_ae,
                    study_uid, dict(classes), t.patient_id, t.patient_name,
                    outcome=0 if not failed else 4, on_durable=self._cleared(uids), wait=wait)
            except RecordNotDurable as exc:
                if not exc.held:  # still owed: back into the tally
                    t.sop_uids[:0] = uids
                    t.sop_classes.update(classes)
                    t.failed += failed
                    self._uncovered += len(uids)
                raise
            except Exception:  # a builder error is a bug; the rows stay owed (start-up)
                LOG.exception("cannot build the transfer record of %d instance(s) from %s",
                              len(uids), self.calling_ae)
                continue
            t.recorded += len(uids)
        if self._uncovered:
            self._oldest = self.clock()

    def _cleared(self, uids: list[str]) -> Callable[[], None] | None:
        if not uids or not self.audit.enabled:
            return None
        index = self.index

        def cleared() -> None:
            try:
                index.transfers_recorded(uids)
            except Exception:  # the rows stay owed: a start-up records them once more
                LOG.exception("cannot mark %d transfer(s) as recorded in the index", len(uids))
        return cleared


def record_pending_transfers(index: Index, storage: Path, audit: Audit, node_ae: str) -> int:
    """Write the transfer records a crash left owed; returns how many instances they cover.

    Grouped per (study, calling AE, called AE); the peer's network address is not kept in
    the index, so these records carry none. Patient identifiers are read from the first
    stored instance of each study (its header only).
    """
    if not audit.enabled:
        return 0
    pending = index.pending_transfers()
    if not pending:
        return 0
    groups: dict[tuple[str, str, str], list[StoredInstance]] = {}
    for row in pending:
        groups.setdefault((row.study_uid, row.calling_ae, row.called_ae), []).append(row)
    from dicomnode.audit import events

    done = 0
    for (study_uid, calling_ae, called_ae), rows in groups.items():
        patient_id, patient_name = _patient(storage / rows[0].path)
        uids = [r.sop_instance_uid for r in rows]
        ledger = TransferLedger(audit, index, calling_ae, None, called_ae or node_ae)
        classes = Counter(r.sop_class_uid for r in rows)
        try:
            audit.record_durably(
                events.instances_received, calling_ae, None, called_ae or node_ae, study_uid,
                dict(classes), patient_id, patient_name,
                description="recorded at start-up: the node stopped before recording them",
                on_durable=ledger._cleared(uids))
        except RecordNotDurable as exc:
            LOG.error("cannot write the transfer records owed from before the restart: %s", exc)
            break
        done += len(uids)
    if done:
        LOG.warning("wrote the transfer records of %d instance(s) acknowledged before the node"
                    " stopped", done)
    return done


def _patient(path: Path) -> tuple[str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientID", "PatientName"])
        return str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or "")
    except Exception:  # unreadable now: the record names the study, not the patient
        LOG.warning("cannot read the patient of a stored instance for its transfer record")
        return "", ""
