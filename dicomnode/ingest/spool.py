"""Durable on-disk storage of received instances.

Layout under the storage folder::

    studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                          partial writes, removed at start-up

An instance is written to ``tmp/``, fsync'd, renamed into place atomically, and its
directory fsync'd: after ``store`` returns the file survives a crash or power loss,
and a crash before that leaves nothing but a temp file. UIDs are validated before
they become path components, so no path can leave the storage folder.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from dicomnode.errors import InvalidUIDError, StorageError
from dicomnode.fsutil import fsync_dir as _fsync_dir

LOG = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def validate_uid(uid: object, what: str = "UID") -> str:
    """Return ``uid`` if it is a syntactically valid DICOM UID (PS3.5 9.1), else raise.

    Leading zeros in components are tolerated (they occur in real data); anything
    but digits and single dots, or more than 64 characters, is refused.
    """
    if not isinstance(uid, str):
        raise InvalidUIDError(f"{what} is missing")
    uid = uid.rstrip("\x00 ")
    if not uid:
        raise InvalidUIDError(f"{what} is empty")
    if len(uid) > 64:
        raise InvalidUIDError(f"{what} is {len(uid)} characters long (at most 64)")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(f"{what} contains characters other than digits and dots")
    return uid




class Spool:
    """Writes instances durably and finds them again."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.tmp = self.root / "tmp"
        for d in (self.root, self.studies, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._dirs_known: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def clean_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many were removed."""
        removed = 0
        for entry in self.tmp.iterdir():
            try:
                entry.unlink()
                removed += 1
            except OSError as exc:
                LOG.warning("cannot remove partial file %s: %s", entry.name, exc)
        return removed

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_uid, "Series Instance UID")
        sop = validate_uid(sop_uid, "SOP Instance UID")
        return self.studies / study / series / f"{sop}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` (and parents) durably: fsync each new entry's parent."""
        if directory in self._dirs_known:
            return
        with self._dirs_lock:
            missing = []
            d = directory
            while not d.exists() and d != self.studies:
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                try:
                    d.mkdir()
                except FileExistsError:
                    pass
                _fsync_dir(d.parent)
            self._dirs_known.add(directory)

    def store(self, target: Path, parts: Sequence[bytes | memoryview]) -> int:
        """Write ``parts`` to ``target`` durably and atomically; return the size.

        Raises StorageError (nothing left behind) on any I/O failure, e.g. disk full.
        """
        tmp = self.tmp / f"{target.stem}.{secrets.token_hex(6)}.part"
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StorageError(f"cannot create a file in the spool: {exc.strerror}") from exc
        try:
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        size += n
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._ensure_dir(target.parent)
            try:
                os.rename(tmp, target)
            except FileNotFoundError:  # folder removed behind our back (e.g. a purge)
                with self._dirs_lock:
                    self._dirs_known.discard(target.parent)
                self._ensure_dir(target.parent)
                os.rename(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StorageError(f"cannot write instance: {reason}") from exc
        return size
