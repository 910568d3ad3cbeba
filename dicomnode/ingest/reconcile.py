"""Bring the index back in line with the spool after an unclean stop.

The instance files are the durable record (fsync'd, renamed, folder fsync'd before
Success); the index commits without an fsync of its own. After a power loss the
newest index rows may be gone while their files are there: this re-indexes them.
It runs at start-up when the previous run did not shut down cleanly.

:func:`backfill_attributes` reads the QIDO-RS attributes of instances indexed without
them (a database from before index schema 2) from their files, at start-up.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pydicom import dcmread

from dicomnode.core.attributes import InstanceAttributes
from dicomnode.core.index import Index, InstanceRecord, StoredInstance
from dicomnode.ingest.spool import Spool

LOG = logging.getLogger(__name__)


def reconcile(index: Index, spool: Spool) -> tuple[int, int]:
    """Index files that have no row; drop rows whose file is gone.

    Returns (files re-indexed, rows dropped). A dropped row means an instance that
    was acknowledged is missing from disk: it is logged as an error.
    """
    known = index.indexed_paths()
    on_disk: set[str] = set()
    added = 0
    for dirpath, _dirs, files in os.walk(spool.studies):
        for name in files:
            if not name.endswith(".dcm"):
                continue
            path = Path(dirpath) / name
            rel = str(path.relative_to(spool.root))
            on_disk.add(rel)
            if rel in known:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                meta = ds.file_meta
                st = path.stat()
                count = ds.get("NumberOfStudyRelatedInstances")
                index.add_instance(InstanceRecord(
                    sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                    sop_class_uid=str(meta.MediaStorageSOPClassUID),
                    study_uid=str(ds.StudyInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax=str(meta.TransferSyntaxUID),
                    calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
                    size=st.st_size,
                    received_at=min(st.st_mtime, time.time()),
                    path=rel,
                    expected_count=int(count) if count else None,
                    attributes=InstanceAttributes.from_dataset(ds),
                ), audit_pending=True)  # its transfer record is owed too (written at start-up)
                added += 1
            except Exception as exc:
                LOG.error("cannot re-index %s: %s", rel, exc)
    missing = sorted(known - on_disk)
    if missing:
        LOG.error("%d indexed instance(s) are missing from disk; dropping their rows so that"
                  " they can be received again", len(missing))
        index.remove_instances(missing)
    if added:
        LOG.warning("re-indexed %d instance file(s) that the index had lost", added)
    return added, len(missing)


def backfill_attributes(index: Index, spool: Spool, *, batch: int = 500) -> int:
    """Read the QIDO-RS attributes of every instance indexed without them (PS3.18 10.6)
    from its file's header; returns how many were read. A file that cannot be read is
    logged and marked, not tried again."""
    done = 0
    started = time.monotonic()
    while rows := index.instances_without_attributes(batch):
        items: list[tuple[StoredInstance, InstanceAttributes | None]] = []
        for row in rows:
            try:
                ds = dcmread(spool.root / row.path, stop_before_pixels=True)
                items.append((row, InstanceAttributes.from_dataset(ds)))
            except Exception as exc:
                LOG.error("cannot read the attributes of %s: %s", row.path, exc)
                items.append((row, None))
        index.set_attributes(items)
        done += len(rows)
    if done:
        LOG.info("read the search attributes of %d indexed instance(s) in %.1f s", done,
                 time.monotonic() - started)
    return done
