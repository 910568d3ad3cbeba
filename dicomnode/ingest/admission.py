"""One way in for an instance, whichever door it came through.

Both front doors, the DIMSE C-STORE SCP (:mod:`dicomnode.ingest.scp`, PS3.4 Annex B)
and STOW-RS (:mod:`dicomnode.ingest.stow`, PS3.18 10.5), hand each instance to
:meth:`AdmissionSession.admit`, which runs the one sequence that decides whether it is
kept:

1. size limit, and the SOP classes the caller may store;
2. UIDs valid (they become file names), header readable (study, series, SOP instance),
   the data set's SOP Instance UID equal to the one the door was told, the study the
   request names (STOW-RS ``/studies/{uid}``);
3. the audit trail writable (fail closed: no record, no instance) and free disk above
   the guard;
4. an instance already held is a success, stored once; the same SOP Instance UID with
   other content is refused (see below);
5. written durably (temp file, fdatasync, rename, folder fsync) and indexed, its
   transfer record owed (:mod:`dicomnode.ingest.transfers`);

and returns an :class:`Outcome` with a :class:`~dicomnode.core.status.Status`. Each
door only translates the outcome into its protocol: a C-STORE response status, or an
entry of the STOW-RS response's Referenced/Failed SOP Sequence. A session is one
association or one STOW-RS request: it tallies what it brought per study and records
"DICOM Instances Transferred" audit events (PS3.15 A.5.3.7) as it goes, every few
instances or seconds and at :meth:`AdmissionSession.close`; the instance that makes a
record due is answered only once that record is on disk.

**A re-send with the same SOP Instance UID and other content** is refused with
0x0111 Duplicate SOP Instance (PS3.7 C.4.x; on STOW-RS the Failure Reason of the
instance, HTTP 409 when nothing else was stored), with an Error Comment saying why.
Not kept as a new version, because:

* a SOP Instance UID names one content (PS3.3 C.12.1.1.1, PS3.5 9): a correction that
  changes an instance must carry a new UID (and the old one be withdrawn, IHE IOCM),
  and a viewer or PACS that sees both versions under one UID cannot tell them apart;
* what the node holds is what its results were computed from and what its audit
  trail names: an instance that any permitted caller could replace by re-sending its
  UID would change the input of results already delivered, silently;
* Success is not an option: it tells the sender the instance is stored (PS3.4 B.2.2),
  and a Warning says the same (stored with a caveat, PS3.4 B.2.3);
* 0x0111 says exactly what happened, and a PACS that treats it as "already there"
  (as many do for a plain re-send) still logs it; the refusal is also logged here
  (UIDs only) and counted as a failure in the session's audit record.

A re-send with the same content (byte for byte, or in another transfer syntax with
every attribute but the pixel data equal: :mod:`dicomnode.ingest.duplicates`) is a
Success, stored once, as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.audit.recorder import Audit, NullAudit, RecordNotDurable
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index, InstanceRecord
from dicomnode.core.status import Status, status_for
from dicomnode.core.uids import check_uid
from dicomnode.errors import InvalidInstanceError, InvalidUIDError, StorageError
from dicomnode.ingest.diskguard import DiskGuard
from dicomnode.ingest.duplicates import dataset_offset, same_content
from dicomnode.ingest.header import HeaderInfo, read_header
from dicomnode.ingest.spool import Spool
from dicomnode.ingest.transfers import RECORD_EVERY, RECORD_SECONDS, StudyTally, TransferLedger

LOG = logging.getLogger(__name__)

# Implementation Class UID: a UUID-derived UID (PS3.5 B.2), fixed for this product.
IMPLEMENTATION_CLASS_UID = "2.25.160285946466287385733542389713476361517"


def implementation_version_name() -> str:
    from dicomnode import __version__

    return f"DICOMNODE_{__version__}"[:16]


#: Every status the doors answer for an instance (C-STORE response status; STOW-RS
#: Failure Reason), and when. The conformance statement's table is generated from this.
ANSWERS: dict[Status, str] = {
    Status.SUCCESS: "stored durably (file fsync'd, index row committed), or already held",
    Status.OUT_OF_RESOURCES: "cannot store now: disk full or below the disk guard, write"
                             " failure, the audit trail cannot be written, instance larger"
                             " than the limit",
    Status.DUPLICATE_SOP_INSTANCE: "an instance with this SOP Instance UID but other"
                                   " content is held already (the held one is kept)",
    Status.CANNOT_UNDERSTAND: "the data set cannot be parsed, or its UIDs are invalid or"
                              " disagree with the command",
    Status.NOT_AUTHORIZED: "the calling AE title may not store this SOP class",
    Status.DATASET_MISMATCH: "STOW-RS: the instance belongs to another study than the"
                             " request's URL names",
    Status.SOP_CLASS_NOT_SUPPORTED: "STOW-RS: a part whose media type is not"
                                    " application/dicom",
    Status.PROCESSING_FAILURE: "an unexpected error (logged with its traceback)",
}


@dataclass(frozen=True, slots=True)
class Arrival:
    """An instance at a door, as the door was told about it, before anything is kept.

    ``file`` is a complete Part 10 file in the spool's ``tmp/`` folder, adopted by
    rename when the instance is kept (never copied): a STOW-RS part as received, or a
    C-STORE data set streamed to disk behind its file meta as its P-DATA fragments
    arrived (:mod:`dicomnode.ingest.streaming`). ``header_bytes`` is what the header is
    read from (the start of the data set); ``size`` is what the size limit is checked
    against (the data set, or the part).
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    header_bytes: bytes | memoryview
    file: Path
    study_uid: str | None = None  # the study the request names, if any


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one arrival: ``status`` Success (stored now, or already held:
    ``duplicate``) or the failure the door reports, with a reason for the log."""

    status: Status
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    header: HeaderInfo | None = None
    reason: str | None = None
    duplicate: bool = False
    comment: str | None = None  # an Error Comment (0000,0902) for the sender, no PHI

    @property
    def stored(self) -> bool:
        return self.status == Status.SUCCESS


class Admission:
    """The admission policy and the durable stores an instance goes to."""

    def __init__(self, config: NodeConfig, spool: Spool, index: Index, *,
                 audit: Audit | None = None, disk_guard: DiskGuard | None = None,
                 record_every: int = RECORD_EVERY, record_seconds: float = RECORD_SECONDS
                 ) -> None:
        self.config = config
        self.record_every = record_every
        self.record_seconds = record_seconds
        self.spool = spool
        self.index = index
        self.audit: Audit = audit or NullAudit()
        rc = config.retention
        self.disk_guard = disk_guard or DiskGuard(
            config.storage, int(rc.min_free_gb * 1e9), rc.min_free_ratio)
        self.implementation_version = implementation_version_name()

    def health(self) -> tuple[bool, str]:
        """Whether new instances can be taken now: audit trail writable, disk above the
        guard (a door may refuse a whole request up front when not)."""
        ok, why = self.audit.health()
        if not ok:
            return ok, why
        return self.disk_guard.check()

    def session(self, calling_ae: str, address: str, called_ae: str | None = None
                ) -> AdmissionSession:
        """A session for one association or one STOW-RS request."""
        return AdmissionSession(self, calling_ae, address, called_ae or self.config.ae_title)


class AdmissionSession:
    """One association's (or request's) instances: admits each, tallies per study."""

    def __init__(self, admission: Admission, calling_ae: str, address: str,
                 called_ae: str) -> None:
        self.admission = admission
        self.calling_ae = calling_ae
        self.address = address
        self.called_ae = called_ae
        self.ledger = TransferLedger(admission.audit, admission.index, calling_ae, address,
                                     called_ae, every=admission.record_every,
                                     seconds=admission.record_seconds)
        self._closed = False

    @property
    def studies(self) -> dict[str, StudyTally]:
        """What the session brought, per study (every study it touched)."""
        return self.ledger.studies

    def admit(self, arrival: Arrival) -> Outcome:
        """Run the admission sequence for one instance; never raises."""
        try:
            outcome = self._admit(arrival)
        except Exception as exc:  # nothing escapes: a bug becomes a processing failure
            LOG.exception("unexpected error while admitting an instance from %s",
                          self.calling_ae)
            outcome = Outcome(status_for(exc), reason=f"{type(exc).__name__}")
        header = outcome.header
        if header is None:
            return outcome
        ledger = self.ledger
        if not outcome.stored:
            ledger.failed(header.study_uid, header.patient_id, header.patient_name)
        elif not outcome.duplicate:
            ledger.stored(header.study_uid, header.patient_id, header.patient_name,
                          outcome.sop_class_uid, outcome.sop_instance_uid)
            if ledger.due:
                try:
                    ledger.record()
                except RecordNotDurable as exc:  # stored and owed, but not acknowledged
                    LOG.error("refused an instance from %s: its transfer record cannot be"
                              " written: %s", self.calling_ae, exc)
                    return Outcome(Status.OUT_OF_RESOURCES, outcome.sop_class_uid,
                                   outcome.sop_instance_uid, header, reason=str(exc))
        return outcome

    def refused_unstored(self, head: bytes | memoryview, transfer_syntax: str,
                         reason: str) -> None:
        """A data set the door refused before it could be kept (out of space, over the
        size limit): counted as a failed transfer of its study, read from its first bytes
        where they hold a header, so that the refusal is audited."""
        try:
            header = read_header(head, transfer_syntax)
        except Exception:  # nothing to name it by: the refusal is logged by the door
            return
        self.ledger.failed(header.study_uid, header.patient_id, header.patient_name)

    def _admit(self, a: Arrival) -> Outcome:
        adm = self.admission
        cfg = adm.config
        limit = cfg.ingest.max_instance_bytes
        if limit is not None and a.size > limit:
            LOG.warning("refused an instance of %d bytes from %s: larger than the limit of %d",
                        a.size, self.calling_ae, limit)
            return Outcome(Status.OUT_OF_RESOURCES, reason="larger than the size limit")
        allowed = cfg.caller_sop_classes(self.calling_ae)
        if allowed is not None and a.sop_class_uid not in allowed:
            LOG.warning("refused SOP class %s from %s: not allowed", a.sop_class_uid,
                        self.calling_ae)
            return Outcome(Status.NOT_AUTHORIZED, reason="SOP class not allowed for the caller")
        try:
            sop_class = check_uid(a.sop_class_uid, "SOP Class UID")
            sop_uid = check_uid(a.sop_instance_uid, "SOP Instance UID")
            check_uid(a.transfer_syntax, "Transfer Syntax UID")
            header = read_header(a.header_bytes, a.transfer_syntax)
            if header.sop_instance_uid is not None and header.sop_instance_uid != sop_uid:
                raise InvalidInstanceError(
                    "SOP Instance UID in the data set differs from the one announced")
            target = adm.spool.instance_path(header.study_uid, header.series_uid, sop_uid)
        except (InvalidInstanceError, InvalidUIDError) as exc:
            LOG.warning("refused an instance from %s: %s", self.calling_ae, exc)
            return Outcome(Status.CANNOT_UNDERSTAND, _valid_or_empty(a.sop_class_uid),
                           _valid_or_empty(a.sop_instance_uid), reason=str(exc))
        if a.study_uid is not None and header.study_uid != a.study_uid:
            return Outcome(Status.DATASET_MISMATCH, sop_class, sop_uid,
                           reason="the instance belongs to another study than the request's")
        for check in (adm.audit.health, adm.disk_guard.check):
            ok, why = check()
            if not ok:  # fail closed; refuse cleanly rather than fail mid-write
                LOG.error("refused an instance from %s: %s", self.calling_ae, why)
                return Outcome(Status.OUT_OF_RESOURCES, sop_class, sop_uid, header, reason=why)
        held = adm.index.instances(sop_uid=sop_uid)
        if held:
            return self._duplicate(a, held[0].path, sop_class, sop_uid, header)
        try:
            size = adm.spool.adopt(a.file, target)
            adm.index.add_instance(InstanceRecord(
                sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                study_uid=header.study_uid, series_uid=header.series_uid,
                transfer_syntax=a.transfer_syntax, calling_ae=self.calling_ae, size=size,
                received_at=time.time(), path=str(target.relative_to(adm.spool.root)),
                expected_count=header.expected_count, called_ae=self.called_ae,
                attributes=header.attributes,
            ), audit_pending=adm.audit.enabled)
        except StorageError as exc:
            LOG.error("cannot store an instance from %s: %s", self.calling_ae, exc)
            return Outcome(Status.OUT_OF_RESOURCES, sop_class, sop_uid, header, reason=str(exc))
        except Exception as exc:
            # the index commit failed: the file may exist, but nothing was acknowledged
            LOG.error("cannot index an instance from %s: %s", self.calling_ae, exc)
            return Outcome(Status.OUT_OF_RESOURCES, sop_class, sop_uid, header,
                           reason="the index cannot be written")
        return Outcome(Status.SUCCESS, sop_class, sop_uid, header)

    def _duplicate(self, a: Arrival, held_path: str, sop_class: str, sop_uid: str,
                   header: HeaderInfo) -> Outcome:
        """The SOP Instance UID is held already: Success when it is the same content,
        0x0111 when it is not (see the module's docstring)."""
        adm = self.admission
        if same_content(adm.spool.root / held_path, a.transfer_syntax, file=a.file,
                        offset=dataset_offset(a.file)[1]):
            LOG.debug("duplicate SOP instance %s: already stored", sop_uid)
            return Outcome(Status.SUCCESS, sop_class, sop_uid, header, duplicate=True)
        LOG.warning("refused SOP instance %s from %s: an instance with this UID and other"
                    " content is held already (corrections need a new SOP Instance UID)",
                    sop_uid, self.calling_ae)
        return Outcome(Status.DUPLICATE_SOP_INSTANCE, sop_class, sop_uid, header,
                       reason="same SOP Instance UID, other content",
                       comment="SOP Instance UID held with other content; not replaced")

    def close(self) -> None:
        """The 'DICOM Instances Transferred' records of what no record covers yet (one
        per study). Does not wait for the disk: the rows stay owed until the records are
        on it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.ledger.record(wait=False)
        except RecordNotDurable as exc:
            LOG.error("transfer records of the session from %s are owed (written once the"
                      " trail can be written, or at the next start-up): %s", self.calling_ae,
                      exc)


def _valid_or_empty(uid: str) -> str:
    """A UID echoed back in a response only when it is valid."""
    try:
        return check_uid(uid)
    except InvalidUIDError:
        return ""
