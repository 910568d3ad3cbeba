"""Retention: purge old studies once nothing is owed for them, and guard the disk.

:class:`Purger` removes a study -- its instance files, its index rows, its result
folders and its leftover outbox objects -- once its last instance is older than
``max_age_days`` and the node owes nothing for it:

* no job of the study is PENDING or LEASED (work still to run),
* no completion of it waits to be handed to routing, and it is not receiving,
* no delivery of any of its results is pending (results not yet delivered),
* no job or delivery of it failed within the last ``keep_failed_days`` (an operator
  may still retry it, and a retry needs the sources and the results).

Everything else is kept, and the :class:`PurgeReport` says why.

Crash-safe order (each step idempotent; a crash anywhere is finished by the next
:meth:`Purger.run_once` or :meth:`PurgeRecovery.recover`):

1. *Mark*, in ONE index transaction that first re-checks the study (still
   complete, same revision, still old, no hand-off pending): a row in
   ``retention_purges`` (state ``purging``), every path to delete copied into
   ``retention_files``, and the study's ``instances``, ``completions`` and
   ``studies`` rows deleted. From that commit on, no index row points at a file
   that is about to go: readers of the index (routing, the worker, ``status``)
   simply no longer see the study, and the to-do list survives a crash.
2. *Delete files*: outbox objects, result folders, instance files, then empty
   series/study folders. A file whose path an ``instances`` row holds again (the
   same instance received anew after step 1) is left alone.
3. *Audit*: ``on_purged(study_uid, instances, patient_id, patient_name, reason)``
   -- at least once: a crash after it and before step 4 calls it again on resume.
4. *Finish*, in one transaction: the to-do list is dropped and the marker becomes
   ``purged`` (its patient fields cleared).

The patient's ID and name are read from one instance header before step 1 and kept
in the marker row only while the purge is in flight (so that a resumed purge can
still audit them); they are never logged.

Start-up order: call :meth:`PurgeRecovery.recover` *before*
:func:`dicomnode.ingest.reconcile.reconcile`, which would otherwise re-index the
instance files of an interrupted purge as if the index had lost them.

:class:`DiskGuard` tells the receiving side whether there is room for more
instances; it never deletes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicomnode.core.index import Index
from dicomnode.core.layout import JobKey, StorageLayout, folder_name
from dicomnode.core.purges import PurgeLedger
from dicomnode.export.deliveries import Delivery, DeliveryState
from dicomnode.export.outbox import Outbox
from dicomnode.ingest.diskguard import DiskGuard  # noqa: F401  (re-exported)
from dicomnode.queue.base import Job, JobQueue, JobState

LOG = logging.getLogger(__name__)

DAY = 86400.0

PurgedCallback = Callable[[str, int, str | None, str | None, str], None]
"""``on_purged(study_uid, instances, patient_id, patient_name, reason)``."""


_ACTIVE = (JobState.PENDING, JobState.LEASED)


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long data is kept.

    ``max_age_days``: a study (its instances and results) is purged once its last
    instance is older than this and nothing is owed for it. ``keep_failed_days``: a
    study with a delivery or job that failed permanently is kept this long after the
    failure (measured from the failure's last update), so that it can be retried.
    ``dry_run``: report what would be purged, delete nothing.
    """

    max_age_days: float = 30.0
    keep_failed_days: float = 90.0
    dry_run: bool = False

    def __post_init__(self) -> None:
        for name in ("max_age_days", "keep_failed_days"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name}: must be a positive number of days, not {value!r}")
        if not isinstance(self.dry_run, bool):
            raise ValueError(f"dry_run: must be True or False, not {self.dry_run!r}")

    @property
    def max_age_seconds(self) -> float:
        return float(self.max_age_days) * DAY

    @property
    def keep_failed_seconds(self) -> float:
        return float(self.keep_failed_days) * DAY


@dataclass(frozen=True, slots=True)
class PurgedStudy:
    """One study purged (or, in a dry run, that would be)."""

    study_uid: str
    instances: int
    result_folders: int
    outbox_objects: int
    bytes: int
    reason: str
    resumed: bool = False
    """True when this finished a purge that an earlier run started (after a crash)."""


@dataclass(slots=True)
class PurgeReport:
    """What one :meth:`Purger.run_once` did.

    ``kept``: study UID -> why an old study was kept. ``young``: how many studies
    are not old enough yet. ``errors``: study UID -> what went wrong (the study is
    retried by the next run).
    """

    started_at: float
    dry_run: bool
    purged: list[PurgedStudy] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    young: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_freed(self) -> int:
        return 0 if self.dry_run else sum(p.bytes for p in self.purged)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the CLI); holds UIDs and counts, no patient data."""
        return {
            "started_at": self.started_at,
            "dry_run": self.dry_run,
            "purged": [
                {"study_uid": p.study_uid, "instances": p.instances,
                 "result_folders": p.result_folders, "outbox_objects": p.outbox_objects,
                 "bytes": p.bytes, "reason": p.reason, "resumed": p.resumed}
                for p in self.purged
            ],
            "kept": dict(self.kept),
            "young": self.young,
            "errors": dict(self.errors),
            "bytes_freed": self.bytes_freed,
        }


@dataclass(slots=True)
class _Owed:
    """What one run learnt about the jobs, deliveries and results of every study."""

    active_jobs: dict[str, int] = field(default_factory=dict)
    failed_until: dict[str, float] = field(default_factory=dict)
    pending_deliveries: dict[str, int] = field(default_factory=dict)
    pending_sops: set[str] = field(default_factory=set)
    result_dirs: dict[str, set[Path]] = field(default_factory=dict)
    result_sops: dict[str, set[str]] = field(default_factory=dict)


def _study_of_key(key: str) -> str | None:
    """The study UID of a job key, or None for a key of another form."""
    try:
        return JobKey.parse(key).study_uid
    except ValueError:
        return None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# -- the purger ------------------------------------------------------------------------------


class PurgeRecovery:
    """Steps 2-4 of a purge, for the studies marked ``purging`` in the index.

    All that finishing an interrupted purge needs (no queue, no outbox), so that the
    node can run :meth:`recover` at start-up before anything else touches the index.
    ``storage``, ``index``, ``clock``, ``on_purged``: as for :class:`Purger`.
    Creates its two bookkeeping tables in the index database when constructed.
    """

    def __init__(
        self,
        storage: Path | str,
        index: Index,
        clock: Callable[[], float] = time.time,
        on_purged: PurgedCallback | None = None,
    ) -> None:
        if not isinstance(storage, str | Path) or not str(storage):
            raise ValueError(f"storage: must be a folder path, not {storage!r}")
        if not isinstance(index, Index):
            raise ValueError(f"index: must be an Index, not {type(index).__name__}")
        if not callable(clock):
            raise ValueError("clock: must be a callable returning seconds since the epoch")
        if on_purged is not None and not callable(on_purged):
            raise ValueError("on_purged: must be callable or None")
        self.storage = Path(storage)
        layout = StorageLayout(storage)
        self.studies_dir = layout.studies
        self.results_dir = layout.results
        self.index = index
        self.ledger = PurgeLedger(index)
        self.clock = clock
        self.on_purged = on_purged
        self._run_lock = threading.Lock()

    def recover(self) -> list[PurgedStudy]:
        """Finish every purge a crash interrupted; call at start-up, before reconcile.

        A study that cannot be finished is logged and left for the next attempt.
        """
        with self._run_lock:
            report = PurgeReport(started_at=float(self.clock()), dry_run=False)
            self._resume_all(report)
            return report.purged

    def in_flight(self) -> list[str]:
        """The studies whose purge was started and not finished."""
        return self.ledger.in_flight()

    # -- steps 2-4 ----------------------------------------------------------------------------

    def _resume_all(self, report: PurgeReport) -> None:
        for uid in self.ledger.in_flight():
            LOG.warning("retention: finishing the interrupted purge of study %s", uid)
            try:
                report.purged.append(self._finish(uid, resumed=True))
            except Exception as exc:
                LOG.exception("retention: finishing the purge of study %s failed", uid)
                report.errors[uid] = f"{type(exc).__name__}: {exc}"

    def _finish(self, uid: str, *, resumed: bool) -> PurgedStudy:
        """Steps 2-4 for a study marked ``purging``: delete files, audit, mark purged."""
        marker = self.ledger.marker(uid)
        todo = self.ledger.files(uid)
        # instances of this study received (again) since step 1 have rows of their own
        live = set(self.index.study_paths(uid))
        counts = {"instance": 0, "result": 0, "outbox": 0}
        parents: set[Path] = set()
        for kind, raw in todo:
            counts[kind] += 1
            if kind == "instance":
                if raw in live:
                    # received again since step 1: that file belongs to the new row now
                    LOG.info("retention: %s was received again; its file is kept", raw)
                    continue
                path = self.storage / raw
                parents.add(path.parent)
            else:
                path = Path(raw)
            self._remove(path, kind)
        for series_dir in sorted(parents):
            self._remove_empty(series_dir)
            self._remove_empty(series_dir.parent)
        reason = marker.reason
        if self.on_purged is not None:
            self.on_purged(uid, marker.instances, marker.patient_id, marker.patient_name,
                           reason)
        self.ledger.finish(uid, float(self.clock()))
        LOG.info("retention: study %s purged%s", uid, " (resumed)" if resumed else "")
        return PurgedStudy(uid, marker.instances, counts["result"], counts["outbox"],
                           marker.bytes, reason, resumed)

    def _remove(self, path: Path, kind: str) -> None:
        """Delete one file (or a result folder); a missing one is already done."""
        if kind == "result":
            if path.is_dir():
                shutil.rmtree(path)
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _remove_empty(self, folder: Path) -> None:
        """Remove ``folder`` if it is empty and inside ``studies/``."""
        if folder == self.studies_dir or self.studies_dir not in folder.parents:
            return
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # not empty: instances of the study received again meanwhile
            pass


class Purger(PurgeRecovery):
    """Purges the studies that the policy says may go (see the module docstring).

    ``storage``: the node's storage folder (``studies/``, ``results/``; the index's
    instance paths are relative to it). ``index``, ``queue``, ``outbox``: the node's
    own (``outbox`` None only when the storage has no outbox at all). ``clock``:
    seconds since the epoch. ``on_purged``: called once per purged study (at least
    once across a crash) with ``(study_uid, instances, patient_id, patient_name,
    reason)``, for the audit trail; the patient values are None when no header could
    be read.
    """

    def __init__(
        self,
        storage: Path | str,
        index: Index,
        queue: JobQueue,
        outbox: Outbox | None,
        policy: RetentionPolicy,
        clock: Callable[[], float] = time.time,
        on_purged: PurgedCallback | None = None,
    ) -> None:
        if not isinstance(queue, JobQueue):
            raise ValueError(f"queue: must be a JobQueue, not {type(queue).__name__}")
        if outbox is not None and not isinstance(outbox, Outbox):
            raise ValueError(f"outbox: must be an Outbox or None, not {type(outbox).__name__}")
        if not isinstance(policy, RetentionPolicy):
            raise ValueError(f"policy: must be a RetentionPolicy, not {type(policy).__name__}")
        super().__init__(storage, index, clock, on_purged)
        self.queue = queue
        self.outbox = outbox
        self.policy = policy

    # -- public ------------------------------------------------------------------------------

    def run_once(self) -> PurgeReport:
        """Finish interrupted purges, then purge every old study that owes nothing.

        Never raises for one study's trouble (it lands in ``report.errors`` and the
        next run tries again); a second concurrent call returns an empty report.
        """
        now = float(self.clock())
        report = PurgeReport(started_at=now, dry_run=self.policy.dry_run)
        if not self._run_lock.acquire(blocking=False):
            LOG.warning("retention: a purge is already running; this run is skipped")
            return report
        try:
            self._run(now, report)
        finally:
            self._run_lock.release()
        if report.purged or report.errors:
            LOG.info(
                "retention: %s %d stud%s (%d instance(s), %.1f MB)%s; %d old one(s) kept, "
                "%d not old enough%s",
                "would purge" if report.dry_run else "purged", len(report.purged),
                "y" if len(report.purged) == 1 else "ies",
                sum(p.instances for p in report.purged),
                sum(p.bytes for p in report.purged) / 1e6,
                " (dry run)" if report.dry_run else "", len(report.kept), report.young,
                f"; {len(report.errors)} error(s)" if report.errors else "",
            )
        else:
            LOG.debug("retention: nothing to purge (%d old kept, %d young)",
                      len(report.kept), report.young)
        return report

    # -- one run -------------------------------------------------------------------------------

    def _run(self, now: float, report: PurgeReport) -> None:
        if not report.dry_run:
            self._resume_all(report)
        cutoff = now - self.policy.max_age_seconds
        in_flight = set(self.in_flight())
        # Order matters: the index first, then the queue, then the outbox. A job is
        # added before its completion is marked handed off, and a job's deliveries are
        # queued before it is DONE; reading in this order, whatever was owed at the
        # time the index was read shows up in one of the later reads.
        studies = self.ledger.studies()
        unhanded = self.ledger.not_handed_off()
        candidates = []
        for row in studies:
            uid = row.study_uid
            if uid in in_flight:
                continue
            if row.last_received >= cutoff:
                report.young += 1
            elif row.state != "complete":
                report.kept[uid] = "still receiving instances (not complete)"
            elif uid in unhanded:
                report.kept[uid] = "its completion has not been handed to routing yet"
            else:
                candidates.append((uid, int(row.revision)))
        if not candidates:
            return
        owed = self._owed(now)
        for uid, revision in candidates:
            why = self._why_kept(uid, owed, now)
            if why is not None:
                report.kept[uid] = why
                continue
            reason = f"last instance older than {self.policy.max_age_days:g} days; nothing owed"
            try:
                purged = self._purge(uid, revision, cutoff, reason, owed, report.dry_run)
            except Exception as exc:
                LOG.exception("retention: purging study %s failed; the next run retries", uid)
                report.errors[uid] = f"{type(exc).__name__}: {exc}"
                continue
            if isinstance(purged, str):
                report.kept[uid] = purged
            else:
                report.purged.append(purged)

    def _why_kept(self, uid: str, owed: _Owed, now: float) -> str | None:
        jobs = owed.active_jobs.get(uid, 0)
        if jobs:
            return f"{jobs} job(s) still to run (pending or leased)"
        pending = owed.pending_deliveries.get(uid, 0)
        if pending:
            return f"{pending} result object(s) not yet delivered (pending)"
        until = owed.failed_until.get(uid)
        if until is not None and until > now:
            return (f"a job or delivery failed permanently; kept for "
                    f"{self.policy.keep_failed_days:g} days, until {_when(until)}")
        return None

    def _owed(self, now: float) -> _Owed:
        """Read the jobs, the deliveries and the result folders once for this run."""
        owed = _Owed()
        keep = self.policy.keep_failed_seconds
        failed_keys: dict[str, list[str]] = {}
        for job in self.queue.list(states=[*_ACTIVE, JobState.FAILED]):
            uid = _job_study(job)
            if uid is None:
                continue
            if job.state in _ACTIVE:
                owed.active_jobs[uid] = owed.active_jobs.get(uid, 0) + 1
            else:
                owed.failed_until[uid] = max(owed.failed_until.get(uid, 0.0),
                                             job.updated_at + keep)
                failed_keys.setdefault(uid, []).append(job.key)
        self._scan_results(owed)
        for uid, keys in failed_keys.items():  # a failed job may have left a folder
            for key in keys:
                folder = self.results_dir / folder_name(key)
                if folder.is_dir() and folder not in owed.result_dirs.get(uid, set()):
                    owed.result_dirs.setdefault(uid, set()).add(folder)
                    owed.result_sops.setdefault(uid, set()).update(_object_sops(folder))
        if self.outbox is not None:
            sop_study = {sop: uid for uid, sops in owed.result_sops.items() for sop in sops}
            deliveries: Iterable[Delivery] = self.outbox.list(
                [DeliveryState.PENDING, DeliveryState.FAILED])
            for d in deliveries:
                uid = _study_of_key(d.key) or sop_study.get(d.sop_instance_uid)
                if d.state is DeliveryState.PENDING:
                    owed.pending_sops.add(d.sop_instance_uid)
                    if uid is not None:
                        owed.pending_deliveries[uid] = owed.pending_deliveries.get(uid, 0) + 1
                elif uid is not None:
                    owed.failed_until[uid] = max(owed.failed_until.get(uid, 0.0),
                                                 d.updated_at + keep)
        return owed

    def _scan_results(self, owed: _Owed) -> None:
        """Map each result folder to its study through its ``prediction.json``."""
        if not self.results_dir.is_dir():
            return
        for folder in self.results_dir.iterdir():
            meta = folder / "prediction.json"
            try:
                uid = json.loads(meta.read_text()).get("study_uid")
            except (OSError, ValueError, AttributeError):
                continue
            if not isinstance(uid, str) or not uid:
                continue
            owed.result_dirs.setdefault(uid, set()).add(folder)
            owed.result_sops.setdefault(uid, set()).update(_object_sops(folder))

    # -- purging one study ------------------------------------------------------------------------

    def _purge(self, uid: str, revision: int, cutoff: float, reason: str, owed: _Owed,
               dry_run: bool) -> PurgedStudy | str:
        """Purge one study (steps 1-4); returns why it was kept if it changed meanwhile."""
        paths = self.index.study_paths(uid)
        folders = sorted(owed.result_dirs.get(uid, set()))
        objects: list[Path] = []
        if self.outbox is not None:
            for sop in sorted(owed.result_sops.get(uid, set()) - owed.pending_sops):
                obj = self.outbox.objects_dir / f"{sop}.dcm"
                if obj.exists():
                    objects.append(obj)
        if dry_run:
            size = sum(_size(self.storage / p) for p in paths)
            size += sum(_tree_size(f) for f in folders) + sum(_size(o) for o in objects)
            return PurgedStudy(uid, len(paths), len(folders), len(objects), size, reason)
        patient_id, patient_name = self._read_patient(paths)
        size = sum(_size(self.storage / p) for p in paths)
        size += sum(_tree_size(f) for f in folders) + sum(_size(o) for o in objects)
        # step 1: mark, hand the paths to the to-do list, drop the rows -- atomically
        started = self.ledger.start(uid, revision, cutoff, reason, size, float(self.clock()),
                                    (patient_id, patient_name), [str(o) for o in objects],
                                    [str(f) for f in folders])
        if isinstance(started, str):
            return started
        LOG.info("retention: purging study %s (%d instance(s), %d result folder(s))",
                 uid, started, len(folders))
        return self._finish(uid, resumed=False)

    def _read_patient(self, paths: list[str]) -> tuple[str | None, str | None]:
        """PatientID and PatientName from the first readable instance header."""
        for raw in paths[:5]:
            try:
                ds = dcmread(self.storage / raw, stop_before_pixels=True,
                             specific_tags=["PatientID", "PatientName"])
            except Exception:
                continue
            pid = ds.get("PatientID")
            name = ds.get("PatientName")
            return (None if pid is None else str(pid),
                    None if name is None else str(name))
        LOG.warning("retention: no readable instance header; the purge is audited without "
                    "patient identification")
        return None, None


def _job_study(job: Job) -> str | None:
    uid = job.payload.get("study_uid") if isinstance(job.payload, dict) else None
    if isinstance(uid, str) and uid:
        return uid
    return _study_of_key(job.key)


def _object_sops(folder: Path) -> set[str]:
    """The SOP Instance UIDs of the encoded objects in a result folder."""
    return {p.stem for p in folder.glob("objects/*/*.dcm")}


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


# -- the disk guard ------------------------------------------------------------------------------
