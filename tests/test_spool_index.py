"""The spool writes durably and refuses unsafe UIDs; the index dedups and completes atomically."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dicomnode.core.index import Index, InstanceRecord
from dicomnode.core.uids import check_uid as validate_uid
from dicomnode.errors import InvalidUIDError, StorageError
from dicomnode.ingest.spool import Spool


def _rec(sop: str, study: str = "1.2.3", series: str = "1.2.3.4", t: float = 100.0) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", study, series, "1.2.840.10008.1.2",
                          "SCU", 10, t, f"studies/{study}/{series}/{sop}.dcm")


@pytest.mark.parametrize("uid", ["", "../etc", "1.2.3/4", "1..2", ".1.2", "1.2.", "1.2.a",
                                 "1" * 65, "1.2\x00x", None])
def test_invalid_uids_refused(uid: object) -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(uid)


def test_valid_uid_with_padding() -> None:
    assert validate_uid("1.2.840.10008.1.2\x00") == "1.2.840.10008.1.2"


def test_store_is_atomic_and_in_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    target = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert target == tmp_path / "studies/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    size = spool.store(target, [b"abc", memoryview(b"defg")])
    assert size == 7 and target.read_bytes() == b"abcdefg"
    assert list(spool.tmp.iterdir()) == []
    with pytest.raises(InvalidUIDError):
        spool.instance_path("1.2.3", "..", "1.2")


def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    target = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if len(data) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageError, match="disk full"):
        spool.store(target, [b"abc", b"defgh"])
    assert not target.exists()
    assert list(spool.tmp.iterdir()) == []


def test_clean_tmp_removes_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.tmp / "x.part").write_bytes(b"partial")
    assert spool.clean_tmp() == 1 and list(spool.tmp.iterdir()) == []


def test_index_dedup_and_revisions(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    assert index.add_instance(_rec("1.1"))
    assert not index.add_instance(_rec("1.1"))  # same SOP Instance UID: stored once
    assert index.add_instance(_rec("1.2", t=101))
    assert index.receiving_studies() == {"1.2.3": 101}
    first = index.complete_study("1.2.3", "test")
    assert first is not None and first.revision == 1 and first.instance_count == 2
    assert index.complete_study("1.2.3", "again") is None  # already complete
    assert index.add_instance(_rec("1.3", t=102))  # late instance re-opens
    second = index.complete_study("1.2.3", "test")
    assert second is not None and second.revision == 2 and second.instance_count == 3
    assert [c.revision for c in index.pending_handoffs()] == [1, 2]
    index.mark_handed_off(first.id)
    assert [c.revision for c in index.pending_handoffs()] == [2]
    summary = index.summary()
    assert summary[0]["instances"] == 3 and summary[0]["revision"] == 2
    index.close()


def test_store_recreates_a_removed_folder(tmp_path: Path) -> None:
    import shutil

    spool = Spool(tmp_path)
    first = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.store(first, [b"a"])
    shutil.rmtree(spool.studies / "1.2.3")
    second = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    spool.store(second, [b"b"])
    assert second.read_bytes() == b"b"
