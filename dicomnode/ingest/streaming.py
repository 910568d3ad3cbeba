"""A C-STORE data set written to the spool as its fragments arrive (PS3.8 Annex E).

The DIMSE door (:mod:`dicomnode.ingest.pynetdicom_dimse`) opens a
:class:`DatasetStream` as soon as a C-STORE-RQ's command set is complete and hands it
each data set fragment as its P-DATA-TF PDU arrives; memory holds one write buffer
(:data:`WRITE_BUFFER`), never the data set. The result, a :class:`StreamedDataset`, is
a complete Part 10 file in the spool's ``tmp/`` folder that the admission adopts by
rename (no copy), exactly as a STOW-RS part.

The File Meta Information (PS3.10 7.1) is written first: everything it holds is known
before the first data set byte, since PS3.7 9.3.1.1 and PS3.8 E.2 send the whole
command set (Affected SOP Class and Instance UIDs) first and the presentation context
fixes the transfer syntax. Nothing is reserved or rewritten afterwards. The UIDs are
written as the command set gave them; the admission checks them before the file is
kept.

A data set longer than ``ingest.max_instance_bytes``, one arriving while the disk is
below the disk guard, or one that cannot be written is refused as soon as that is
known: the temp file is removed at once and the remaining fragments are counted but not
kept; the C-STORE is then answered 0xA700.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.ingest.diskguard import DiskGuard
from dicomnode.ingest.spool import Spool

LOG = logging.getLogger(__name__)

#: Bytes gathered before a write(): one write per MiB instead of one per fragment.
WRITE_BUFFER = 1 << 20
#: data set bytes kept in memory whatever becomes of the data set (its header, for audit)
HEAD_KEPT = 64 << 10
#: How much of the data set the header scan may look at (as for STOW-RS parts).
HEADER_WINDOW = 8 << 20


class StreamedDataset:
    """A received data set: ``path`` (a Part 10 file in the spool's ``tmp/``, the data
    set starting at ``meta_length``), or None with ``refused`` saying why it was not
    kept; ``size`` counts every data set byte received, kept or not. ``whole``: the
    file's bytes, when it was written in one piece (a data set under
    :data:`WRITE_BUFFER`): the header is then read from them, not from the file."""

    __slots__ = ("path", "size", "meta_length", "refused", "whole", "head")

    def __init__(self, path: Path | None, size: int, meta_length: int,
                 refused: str | None, whole: bytearray | None = None,
                 head: bytes = b"") -> None:
        self.path = path
        self.size = size
        self.meta_length = meta_length
        self.refused = refused
        self.whole = whole
        #: the first bytes of the data set, kept even when it was refused (so that the
        #: refusal can be audited under its study)
        self.head = head

    def adopted(self) -> None:
        """The spool adopted the file (renamed it into place): nothing to discard."""
        self.path = None
        self.whole = None

    def discard(self) -> None:
        """Remove the file unless the spool adopted it. Idempotent."""
        path, self.path = self.path, None
        self.whole = None
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # adopted (renamed into studies/)
            except OSError as exc:
                LOG.warning("cannot remove the temp file %s: %s", path.name, exc.strerror)

    @contextmanager
    def header(self) -> Iterator[memoryview]:
        """The first :data:`HEADER_WINDOW` bytes of the data set, mapped from the file
        (no copy; only the pages the header scan reads are paged in)."""
        n = min(self.size, HEADER_WINDOW)
        if self.path is None or n == 0:
            yield memoryview(b"")
            return
        if self.whole is not None:
            yield memoryview(self.whole)[self.meta_length:self.meta_length + n]
            return
        with self.path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), self.meta_length + n, access=mmap.ACCESS_READ)
        view = memoryview(mapped)[self.meta_length:]
        try:
            yield view
        finally:
            try:
                view.release()
                mapped.close()
            except BufferError:  # a view into it is still alive: unmapped when collected
                pass


class DatasetStream:
    """Writes one data set to a temp file in ``spool``'s ``tmp/`` as it arrives.

    Never raises: a failure turns into a refusal carried by :meth:`finish`'s result.
    ``limit``: the largest data set kept, bytes (None: no limit); ``disk_guard`` is
    consulted before the file is created and before each write. Written by the
    connection's reader thread; :meth:`discard` may come from the association's.
    """

    def __init__(self, spool: Spool, meta: bytes, *, limit: int | None = None,
                 disk_guard: DiskGuard | None = None) -> None:
        self._limit = limit
        self._guard = disk_guard
        self._meta_length = len(meta)
        self.size = 0
        self.refused: str | None = None
        self._fd = -1
        self._path: Path | None = None
        self._written = False  # a write() has happened: the file is in pieces
        self._buf = bytearray(meta)
        self._head = bytearray()  # the first HEAD_KEPT bytes of the data set
        self._lock = threading.Lock()
        if disk_guard is not None:
            ok, why = disk_guard.check()
            if not ok:
                self.refused = why
                return
        try:
            self._fd, self._path = spool.open_tmp("c-store")
        except OSError as exc:
            self.refused = _io_reason(exc)

    def write(self, data: memoryview) -> None:
        """One data set fragment (its bytes are copied before this returns)."""
        with self._lock:
            self.size += len(data)
            if len(self._head) < HEAD_KEPT:
                self._head += data[:HEAD_KEPT - len(self._head)]
            if self._fd < 0:
                return  # refused: count only
            if self._limit is not None and self.size > self._limit:
                self._refuse(f"larger than the limit of {self._limit} bytes"
                             " (ingest.max_instance_bytes)")
                return
            self._buf += data
            if len(self._buf) >= WRITE_BUFFER:
                self._flush()

    def _flush(self, keep: bool = False) -> None:
        if self._guard is not None:
            ok, why = self._guard.check()
            if not ok:
                self._refuse(why)
                return
        try:
            view = memoryview(self._buf)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            finally:
                view.release()
        except OSError as exc:
            self._refuse(_io_reason(exc))
            return
        self._written = True
        if keep:
            self._buf = bytearray()  # the caller holds on to the bytes just written
        else:
            del self._buf[:]

    def _refuse(self, reason: str) -> None:
        if self.refused is None:
            self.refused = reason
        self._buf = bytearray()
        self._close()
        if self._path is not None:
            try:
                self._path.unlink()
            except OSError:
                pass
            self._path = None

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def finish(self) -> StreamedDataset:
        """The last fragment has arrived: the file is complete (not yet synced: the
        spool's adopt() fdatasyncs it) or the data set was refused."""
        with self._lock:
            whole = None
            if self._fd >= 0:
                # written in one piece (no write() yet): keep the bytes for the header
                keep = not self._written
                buf = self._buf
                self._flush(keep=keep)
                if keep and self._fd >= 0:
                    whole = buf
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    os.close(fd)
                except OSError as exc:  # NFS and friends report write errors at close
                    self._refuse(_io_reason(exc))
            path, self._path = self._path, None
            if self.refused is not None:
                return StreamedDataset(None, self.size, self._meta_length, self.refused,
                                       head=bytes(self._head))
            return StreamedDataset(path, self.size, self._meta_length, None, whole)

    def discard(self) -> None:
        """The data set will never complete: remove what was written. Idempotent."""
        with self._lock:
            self._refuse("the association ended before the data set was complete")


def _io_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "cannot write instance: disk full"
    return f"cannot write instance: {exc.strerror}"
