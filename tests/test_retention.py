"""Retention: purging old, fully delivered studies, and the disk-pressure guard.

Built on the node's real stores (Spool, Index, SQLiteJobQueue, Outbox) in a temporary
storage folder, with synthetic instances and a fake clock.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.core.index import Index, InstanceRecord
from dicomnode.core.layout import folder_name as _result_dir_name
from dicomnode.export.outbox import Outbox
from dicomnode.ingest.reconcile import reconcile
from dicomnode.ingest.spool import Spool
from dicomnode.queue.sqlite import SQLiteJobQueue
from dicomnode.retention import (
    DAY,
    DiskGuard,
    Purger,
    PurgeRecovery,
    RetentionPolicy,
)
from dicomnode.synthetic import make_ct_series

PATIENT_ID = "SYNTH0001"
PATIENT_NAME = "SYNTHETIC^PHANTOM"
NOW = 1_900_000_000.0
OLD = NOW - 40 * DAY
DEST = "PACS"


class Crash(BaseException):
    """A simulated process death: not an Exception, so nothing on the way catches it."""


@dataclass
class Study:
    uid: str
    series_uid: str
    paths: list[str]  # relative to the storage folder
    job_key: str | None = None
    result_dir: Path | None = None
    result_sops: list[str] | None = None


class Node:
    """The stores of one storage folder, a fake clock and the purger's audit calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = NOW
        self.spool = Spool(root)
        self.index = Index(Index.path_for(root))
        self.queue = SQLiteJobQueue(SQLiteJobQueue.path_for(root), clock=self.clock)
        self.outbox = Outbox(root, clock=self.clock)
        self.purged: list[tuple[str, int, str | None, str | None, str]] = []
        self._n = 0

    def clock(self) -> float:
        return self.now

    def close(self) -> None:
        self.index.close()
        self.queue.close()
        self.outbox.close()

    def purger(self, **policy: Any) -> Purger:
        return Purger(self.root, self.index, self.queue, self.outbox, RetentionPolicy(**policy),
                      clock=self.clock, on_purged=lambda *a: self.purged.append(a))

    # -- building data -------------------------------------------------------------

    def ingest(self, received_at: float, n: int = 3) -> Study:
        """Store a small synthetic CT series as the SCP would, and complete the study."""
        self._n += 1
        study_uid = generate_uid(prefix="2.25.")
        src = make_ct_series(self.root.parent / f"src{self._n}", n_slices=n, rows=16, cols=16,
                             study_uid=study_uid, seed=self._n)
        rel = []
        series_uid = ""
        for p in src:
            ds = dcmread(p, stop_before_pixels=True)
            series_uid = str(ds.SeriesInstanceUID)
            target = self.spool.instance_path(study_uid, series_uid, str(ds.SOPInstanceUID))
            size = self.spool.store(target, [p.read_bytes()])
            path = str(target.relative_to(self.root))
            self.index.add_instance(InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_uid=study_uid, series_uid=series_uid,
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="MODALITY",
                size=size, received_at=received_at, path=path))
            rel.append(path)
        completion = self.index.complete_study(study_uid, "quiet")
        assert completion is not None
        self.index.mark_handed_off(completion.id)
        return Study(study_uid, series_uid, rel)

    def add_job(self, study: Study, *, finish: bool = True) -> str:
        key = f"{study.uid}/1/lungs/{study.series_uid}/lung"
        job = self.queue.add(key, "lung", {"study_uid": study.uid, "revision": 1,
                                           "series_uid": study.series_uid, "rule": "lungs",
                                           "destinations": [DEST]})
        if finish:
            (leased,) = self.queue.acquire("w", 60)
            assert leased.id == job.id
        study.job_key = key
        return key

    def add_result(self, study: Study, *, deliver: str | None) -> list[int]:
        """A finished job with a result folder and one encoded object queued for DEST.

        ``deliver``: None leaves the delivery pending, "sent" / "failed" records it.
        """
        key = self.add_job(study)
        folder = self.root / "results" / _result_dir_name(key)
        (folder / "objects" / "seg").mkdir(parents=True)
        (folder / "prediction.json").write_text(json.dumps(
            {"job_key": key, "study_uid": study.uid, "series_uid": study.series_uid}))
        (folder / "labels.npz").write_bytes(b"labels")
        ds = dcmread(self.root / study.paths[0])
        sop = generate_uid(prefix="2.25.")
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        obj = folder / "objects" / "seg" / f"{sop}.dcm"
        ds.save_as(obj, enforce_file_format=True)
        ids = [d.id for d in self.outbox.enqueue(DEST, [obj], key=key)]
        self.queue.release(self.queue.list(states=["leased"])[0].id, "w", result={"ok": 1})
        if deliver == "sent":
            self.outbox.mark_sent(ids)
        elif deliver == "failed":
            self.outbox.mark_failed(ids, "permanent", "refused by the peer")
        study.result_dir, study.result_sops = folder, [sop]
        return ids

    # -- looking -----------------------------------------------------------------------

    def rows(self, study: Study) -> dict[str, int]:
        out = {}
        for table in ("instances", "studies", "completions"):
            out[table] = self.index.query(
                f"SELECT count(*) AS n FROM {table} WHERE study_uid = ?", (study.uid,))[0]["n"]
        return out

    def files_exist(self, study: Study) -> list[bool]:
        return [(self.root / p).exists() for p in study.paths]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    storage = tmp_path / "storage"
    n = Node(storage)
    yield n
    n.close()


def assert_purged(node: Node, study: Study) -> None:
    assert not any(node.files_exist(study))
    assert not (node.root / "studies" / study.uid).exists()
    assert node.rows(study) == {"instances": 0, "studies": 0, "completions": 0}
    if study.result_dir is not None:
        assert not study.result_dir.exists()
        for sop in study.result_sops or []:
            assert not (node.outbox.objects_dir / f"{sop}.dcm").exists()


def assert_kept(node: Node, study: Study) -> None:
    assert all(node.files_exist(study))
    assert node.rows(study) == {"instances": len(study.paths), "studies": 1, "completions": 1}
    if study.result_dir is not None:
        assert (study.result_dir / "prediction.json").is_file()


# -- the purge ---------------------------------------------------------------------------


def test_old_delivered_study_is_purged(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    old = node.ingest(OLD)
    node.add_result(old, deliver="sent")
    # a leftover outbox object (as a crash between 'sent' and its unlink leaves one)
    leftover = node.outbox.objects_dir / f"{old.result_sops[0]}.dcm"  # type: ignore[index]
    leftover.write_bytes(b"x")
    young = node.ingest(NOW - 2 * DAY)

    report = node.purger(max_age_days=30).run_once()

    assert [p.study_uid for p in report.purged] == [old.uid]
    assert report.purged[0].instances == 3
    assert report.purged[0].result_folders == 1
    assert report.purged[0].bytes > 0
    assert report.young == 1 and not report.errors
    assert_purged(node, old)
    assert_kept(node, young)
    assert node.purged == [(old.uid, 3, PATIENT_ID, PATIENT_NAME, report.purged[0].reason)]
    # the delivery stays as a record; the marker keeps no patient data
    assert [d.state.value for d in node.outbox.list()] == ["sent"]
    marker = node.index.query("SELECT * FROM retention_purges")
    assert [(m["state"], m["patient_id"], m["patient_name"]) for m in marker] == [
        ("purged", None, None)]
    assert not node.index.query("SELECT * FROM retention_files")
    # nothing logged names the patient
    assert PATIENT_ID not in caplog.text and "PHANTOM" not in caplog.text

    again = node.purger(max_age_days=30).run_once()
    assert not again.purged and len(node.purged) == 1
    assert json.dumps(report.as_dict())  # JSON-able for the CLI


def test_study_received_again_after_purge_is_stored_anew(node: Node) -> None:
    old = node.ingest(OLD)
    node.purger().run_once()
    assert_purged(node, old)
    # the same study UID again: the spool recreates its folders
    again = node.ingest(NOW)
    assert all(node.files_exist(again))


def test_old_study_with_pending_delivery_is_kept(node: Node) -> None:
    old = node.ingest(OLD)
    ids = node.add_result(old, deliver=None)

    report = node.purger().run_once()

    assert not report.purged and not node.purged
    assert "not yet delivered" in report.kept[old.uid]
    assert_kept(node, old)
    assert node.outbox.get(ids[0]).path.exists()  # type: ignore[union-attr]

    node.outbox.mark_sent(ids)
    report = node.purger().run_once()
    assert [p.study_uid for p in report.purged] == [old.uid]
    assert_purged(node, old)


def test_transient_failure_still_pending_keeps_study(node: Node) -> None:
    old = node.ingest(OLD)
    ids = node.add_result(old, deliver=None)
    node.outbox.mark_failed(ids, "transient", "peer down")  # pending again, later
    report = node.purger().run_once()
    assert "not yet delivered" in report.kept[old.uid]
    assert_kept(node, old)


@pytest.mark.parametrize("leased", [False, True], ids=["pending", "leased"])
def test_old_study_with_job_to_run_is_kept(node: Node, leased: bool) -> None:
    old = node.ingest(OLD)
    node.add_job(old, finish=leased)  # finish=True leaves it leased

    report = node.purger().run_once()

    assert "job(s) still to run" in report.kept[old.uid]
    assert not report.purged and not node.purged
    assert_kept(node, old)


def test_young_study_is_kept(node: Node) -> None:
    young = node.ingest(NOW - 29 * DAY)
    report = node.purger(max_age_days=30).run_once()
    assert report.young == 1 and not report.purged and not report.kept
    assert_kept(node, young)
    node.now += 2 * DAY
    assert [p.study_uid for p in node.purger(max_age_days=30).run_once().purged] == [young.uid]


def test_receiving_study_is_kept(node: Node) -> None:
    old = node.ingest(OLD)
    # a late image re-opens the study (with an old timestamp: only its state matters)
    p = make_ct_series(node.root.parent / "late", n_slices=1, rows=16, cols=16,
                       study_uid=old.uid, seed=99)[0]
    ds = dcmread(p, stop_before_pixels=True)
    target = node.spool.instance_path(old.uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    node.spool.store(target, [p.read_bytes()])
    node.index.add_instance(InstanceRecord(
        str(ds.SOPInstanceUID), str(ds.SOPClassUID), old.uid, str(ds.SeriesInstanceUID),
        str(ds.file_meta.TransferSyntaxUID), "MODALITY", 1, OLD, str(target.relative_to(node.root))))
    report = node.purger().run_once()
    assert "receiving" in report.kept[old.uid]
    assert all(node.files_exist(old))


def test_permanently_failed_delivery_keeps_study_for_keep_failed_days(node: Node) -> None:
    old = node.ingest(OLD)
    node.add_result(old, deliver="failed")  # failed at NOW
    purger = node.purger(max_age_days=30, keep_failed_days=10)

    report = purger.run_once()
    assert "failed permanently" in report.kept[old.uid]
    assert_kept(node, old)

    node.now += 11 * DAY
    report = purger.run_once()
    assert [p.study_uid for p in report.purged] == [old.uid]
    assert_purged(node, old)


def test_dry_run_deletes_nothing(node: Node) -> None:
    old = node.ingest(OLD)
    node.add_result(old, deliver="sent")
    kept = node.ingest(OLD)
    node.add_result(kept, deliver=None)

    report = node.purger(dry_run=True).run_once()

    assert report.dry_run and report.bytes_freed == 0
    assert [p.study_uid for p in report.purged] == [old.uid]
    assert report.purged[0].instances == 3 and report.purged[0].bytes > 0
    assert kept.uid in report.kept
    assert_kept(node, old)
    assert_kept(node, kept)
    assert not node.purged
    assert not node.index.query("SELECT * FROM retention_purges")


# -- crashes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 2, 4, "audit"])
def test_crash_mid_purge_is_completed_by_the_next_run(node: Node, after: int | str) -> None:
    """Die after ``after`` deletions (the outbox object, the result folder, then instance
    files), or in the audit callback; a new purger on the same stores finishes the job."""
    old = node.ingest(OLD)
    node.add_result(old, deliver="sent")
    (node.outbox.objects_dir / f"{old.result_sops[0]}.dcm").write_bytes(b"x")  # type: ignore[index]
    first = node.purger()
    if after == "audit":
        def audit(*args: Any) -> None:
            raise Crash

        first.on_purged = audit
    else:
        real = first._remove
        done = [0]

        def remove(path: Path, kind: str) -> None:
            if done[0] >= after:  # type: ignore[operator]
                raise Crash
            done[0] += 1
            real(path, kind)

        first._remove = remove  # type: ignore[method-assign]

    with pytest.raises(Crash):
        first.run_once()

    # in between, no index row points to a deleted file: the rows went first, atomically
    assert node.rows(old) == {"instances": 0, "studies": 0, "completions": 0}
    assert node.index.query("SELECT state FROM retention_purges")[0]["state"] == "purging"

    # "restart": recover (no queue or outbox needed) before reconcile, as start-up should
    recovered = PurgeRecovery(node.root, node.index, clock=node.clock,
                              on_purged=lambda *a: node.purged.append(a)).recover()
    assert [(p.study_uid, p.resumed) for p in recovered] == [(old.uid, True)]
    assert reconcile(node.index, node.spool) == (0, 0)
    assert_purged(node, old)
    assert node.purged == [(old.uid, 3, PATIENT_ID, PATIENT_NAME, recovered[0].reason)]
    assert not node.index.query("SELECT * FROM retention_files")
    assert not node.purger().run_once().purged


def test_error_mid_purge_is_reported_and_retried(node: Node) -> None:
    old = node.ingest(OLD)
    purger = node.purger()
    real = purger._remove
    calls = [0]

    def flaky(path: Path, kind: str) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise PermissionError("simulated")
        real(path, kind)

    purger._remove = flaky  # type: ignore[method-assign]
    report = purger.run_once()
    assert "PermissionError" in report.errors[old.uid] and not node.purged
    report = purger.run_once()
    assert [(p.study_uid, p.resumed) for p in report.purged] == [(old.uid, True)]
    assert_purged(node, old)
    assert len(node.purged) == 1


def test_instance_received_again_during_purge_keeps_its_file(node: Node) -> None:
    """The same SOP instance stored again between marking and deleting keeps its file."""
    old = node.ingest(OLD)
    purger = node.purger()
    real = purger._remove

    def crash_first(path: Path, kind: str) -> None:
        raise Crash

    purger._remove = crash_first  # type: ignore[method-assign]
    with pytest.raises(Crash):
        purger.run_once()
    # the modality sends one instance again: its file is still there, its row is new
    path = old.paths[0]
    ds = dcmread(node.root / path, stop_before_pixels=True)
    node.index.add_instance(InstanceRecord(
        str(ds.SOPInstanceUID), str(ds.SOPClassUID), old.uid, str(ds.SeriesInstanceUID),
        str(ds.file_meta.TransferSyntaxUID), "MODALITY", 1, NOW, path))
    purger._remove = real  # type: ignore[method-assign]
    purger.recover()
    assert node.files_exist(old) == [True, False, False]
    assert node.rows(old)["instances"] == 1


# -- the disk guard ------------------------------------------------------------------------------


def test_disk_guard_huge_threshold_refuses(tmp_path: Path) -> None:
    ok, reason = DiskGuard(tmp_path, min_free_bytes=10**18).check()
    assert not ok
    assert "disk nearly full" in reason and "below the minimum" in reason and "GB" in reason
    ok, reason = DiskGuard(tmp_path, min_free_ratio=0.999999).check()
    assert not ok and "%" in reason


def test_disk_guard_zero_threshold_accepts(tmp_path: Path) -> None:
    ok, reason = DiskGuard(tmp_path, 0, 0.0).check()
    assert ok and "free" in reason


def test_disk_guard_caches_for_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real = os.statvfs

    def counting(path: Any) -> os.statvfs_result:
        calls[0] += 1
        return real(path)

    monkeypatch.setattr(os, "statvfs", counting)
    t = [100.0]
    guard = DiskGuard(tmp_path, 0, 0.0, monotonic=lambda: t[0])
    for _ in range(1000):
        guard.check()
    assert calls[0] == 1
    t[0] += 1.5
    guard.check()
    assert calls[0] == 2


@pytest.mark.parametrize("kwargs", [
    {"min_free_bytes": -1}, {"min_free_ratio": 1.0}, {"min_free_ratio": -0.1},
])
def test_disk_guard_validates(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DiskGuard(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"max_age_days": 0}, {"keep_failed_days": -1}, {"max_age_days": float("nan")},
    {"dry_run": "yes"},
])
def test_policy_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetentionPolicy(**kwargs)
