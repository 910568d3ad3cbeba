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
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from dicomnode.core.layout import StorageLayout
from dicomnode.core.layout import fsync_dir as _fsync_dir
from dicomnode.errors import StorageError

LOG = logging.getLogger(__name__)


class Spool:
    """Writes instances durably and finds them again."""

    def __init__(self, root: Path) -> None:
        self.layout = StorageLayout(root)
        self.root = self.layout.root
        self.studies = self.layout.studies
        self.tmp = self.layout.tmp
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
        """Where an instance is stored (UIDs checked: no path leaves the folder)."""
        return self.layout.instance_path(study_uid, series_uid, sop_uid)

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

    def _place(self, tmp: Path, target: Path) -> None:
        """Rename ``tmp`` (already synced) to ``target`` and make the entry durable."""
        self._ensure_dir(target.parent)
        try:
            os.rename(tmp, target)
        except FileNotFoundError:  # folder removed behind our back (e.g. a purge)
            with self._dirs_lock:
                self._dirs_known.discard(target.parent)
            self._ensure_dir(target.parent)
            os.rename(tmp, target)
        _fsync_dir(target.parent)

    def adopt(self, tmp: Path, target: Path) -> int:
        """Make the complete file ``tmp`` (written in this spool's ``tmp/`` folder, e.g.
        a STOW-RS part) the stored instance ``target``: fdatasync, rename, folder fsync.
        No copy. Returns the size; raises StorageError (``tmp`` left to its owner)."""
        if Path(tmp).parent.resolve() != self.tmp.resolve():
            raise ValueError(f"tmp: {tmp} is not in the spool's tmp/ folder")
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            self._place(Path(tmp), target)
        except OSError as exc:
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StorageError(f"cannot write instance: {reason}") from exc
        return size

    def open_tmp(self, prefix: str) -> tuple[int, Path]:
        """A new, empty file in ``tmp/`` for writing: ``(fd, path)``; the caller closes
        it and either adopts it (:meth:`adopt`) or removes it. Raises OSError."""
        path = self.tmp / f"{prefix}.{secrets.token_hex(6)}.part"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640), path

    def store(self, target: Path, parts: Sequence[bytes | memoryview]) -> int:
        """Write ``parts`` to ``target`` durably and atomically; return the size.

        Raises StorageError (nothing left behind) on any I/O failure, e.g. disk full.
        """
        tmp = self.tmp / f"{target.stem}.{secrets.token_hex(6)}.part"
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
            self._place(tmp, target)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StorageError(f"cannot write instance: {reason}") from exc
        return size
