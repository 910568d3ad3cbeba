"""Bring the index back in line with the spool after an unclean stop.

The instance files are the durable record (fsync'd, renamed, folder fsync'd before
Success); the index commits without an fsync of its own. After a power loss the
newest index rows may be gone while their files are there: this re-indexes them.
It runs at start-up when the previous run did not shut down cleanly.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pydicom import dcmread

from dicomnode.core.index import Index, InstanceRecord
from dicomnode.ingest.spool import Spool

LOG = logging.getLogger(__name__)

_TAGS = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
         "NumberOfStudyRelatedInstances"]


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
                ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
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
                ))
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
