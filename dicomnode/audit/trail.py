"""The audit trail's writer: encrypted, hash-chained, signed, append-only segment files.

One :class:`AuditTrail` per folder appends the records of one process to its hash chain.
The format of the segment files is defined in :mod:`dicomnode.audit.frames`; checking
and decrypting a trail (with no writer needed) is :mod:`dicomnode.audit.verify`.

Durability: :meth:`AuditTrail.append` queues the record and returns its sequence number;
one writer thread encrypts, writes and ``fdatasync``'s whole batches (group commit).
:meth:`AuditTrail.flush` (or ``append(..., sync=True)``) waits until it is on disk.
After a crash, the start-up finds the last complete valid frame; bytes after it (a torn
write) are logged with segment and offset, copied to ``quarantine/`` and named in the
new segment's ``open`` record, which :func:`~dicomnode.audit.verify.verify` accepts as an
acknowledgement. The segment itself is never rewritten.

Write failures (disk full, I/O error) do not end the trail. The writer rolls its state
back to the last commit that reached the disk, keeps every record not yet written in
memory, and marks the trail *unavailable* (:meth:`AuditTrail.health`): from then on
``append(..., sync=True)`` and :meth:`AuditTrail.flush` raise
:class:`~dicomnode.audit.frames.AuditUnavailableError` at once (callers refuse the work
that needed the record: fail closed), and plain appends are held, up to ``max_pending``.
The writer retries with backoff; each retry first cuts the current segment back to the
length of its last commit (``ftruncate`` + ``fdatasync``: the bytes cut were never
reported durable, so no acknowledged record is touched) and then writes the held
records, the first of them a ``write_failed`` control record naming the error. So the
chain goes on without a gap or a torn record, and ``dicomnode audit verify`` passes
without a restart once the cause has gone.

Nothing here logs a record body: bodies carry patient identifiers (PS3.15 A.5.2.6).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomnode.audit.frames import (
    CHECKPOINT,
    CONTROL,
    DATA,
    MAX_BODY,
    NONCE_LEN,
    ZERO_HASH,
    AuditTrailError,
    AuditUnavailableError,
    TornTail,
    _Bad,
    _encode,
    _Frame,
    _scan,
    _segment_name,
    _segments,
    _signed_message,
)
from dicomnode.audit.keys import Keyring, key_fingerprint
from dicomnode.core.layout import fsync_dir as _fsync_dir

LOG = logging.getLogger(__name__)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- recovery ----------------------------------------------------------------------

def _quarantine(folder: Path, segment: Path, offset: int, data: bytes) -> TornTail:
    qdir = folder / "quarantine"
    if not qdir.exists():
        os.mkdir(qdir, 0o700)
    digest = hashlib.sha256(data).hexdigest()
    for n in range(1000):
        path = qdir / f"{segment.name}.{offset}{'' if n == 0 else f'.{n}'}.torn"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if path.read_bytes() == data:  # quarantined before, by a start-up that then died
                break
            continue
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(qdir)
        break
    return TornTail(segment.name, offset, len(data), digest, str(path.relative_to(folder)))


def _recover(folder: Path) -> tuple[int, bytes, int, list[TornTail], bool]:
    """``(last seq, last hash, next segment number, torn tails, previous run closed)``."""
    segments = _segments(folder)
    next_number = segments[-1][0] + 1 if segments else 1
    torn: list[TornTail] = []
    for _, path in reversed(segments):
        buf = path.read_bytes()
        items = _scan(buf)
        for item in items:
            if isinstance(item, _Bad) and not item.at_eof:
                LOG.error("audit segment %s is damaged at byte offset %d (%d bytes); "
                          "`dicomnode audit verify` names the record", path.name, item.offset,
                          item.end - item.offset)
        frames = [i for i in items if isinstance(i, _Frame)]
        tail = items[-1] if items and isinstance(items[-1], _Bad) else None
        if isinstance(tail, _Bad) and tail.at_eof:
            info = _quarantine(folder, path, tail.offset, buf[tail.offset:])
            torn.insert(0, info)
            LOG.warning("audit segment %s: torn record at byte offset %d (%d bytes after the "
                        "last valid record%s), copied to %s; the chain continues after it",
                        path.name, tail.offset, info.length,
                        f", seq {frames[-1].seq}" if frames else "", info.quarantine)
        if frames:
            last = frames[-1]
            closed = last.type == CHECKPOINT and bool(json.loads(last.body).get("final"))
            return last.seq, last.hash, next_number, torn, closed and not torn
    return 0, ZERO_HASH, next_number, torn, not torn and not segments


# -- the writer ----------------------------------------------------------------------

class AuditTrail:
    """An open trail: one writer per folder (an exclusive lock on ``folder/.lock``).

    ``segment_max_bytes``: start a new segment once this size is reached.
    ``flush_interval``: how long a record may wait in memory for others to share its
    fsync (a ``flush()`` or ``sync=True`` cuts it short).
    ``checkpoint_every`` / ``checkpoint_seconds``: write a signed checkpoint after this
    many records or this long after the first unsigned one, whichever comes first; also
    at the end of every segment and at :meth:`close`.
    ``max_pending``: ``append`` blocks while this many records wait (back-pressure when
    the disk stalls); while the trail is unavailable it raises instead of blocking.
    ``retry_seconds``: the first and the longest wait between two attempts to write
    again after a write failure (doubling in between).
    """

    def __init__(self, folder: Path | str, keyring: Keyring, *,
                 segment_max_bytes: int = 16 * 1024 * 1024, flush_interval: float = 0.05,
                 checkpoint_every: int = 1000, checkpoint_seconds: float = 60.0,
                 max_pending: int = 100_000,
                 retry_seconds: tuple[float, float] = (0.25, 5.0)) -> None:
        if not isinstance(keyring, Keyring):
            raise TypeError(f"keyring: expected a Keyring, not {type(keyring).__name__}")
        for name, value, low in (("segment_max_bytes", segment_max_bytes, 4096),
                                 ("checkpoint_every", checkpoint_every, 1),
                                 ("max_pending", max_pending, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, not {value!r}")
        for name, fvalue in (("flush_interval", flush_interval),
                             ("checkpoint_seconds", checkpoint_seconds)):
            if not isinstance(fvalue, int | float) or fvalue < 0:
                raise ValueError(f"{name}: must be a number of seconds >= 0, not {fvalue!r}")
        if (not isinstance(retry_seconds, tuple) or len(retry_seconds) != 2
                or not all(isinstance(v, int | float) and v > 0 for v in retry_seconds)
                or retry_seconds[0] > retry_seconds[1]):
            raise ValueError(f"retry_seconds: must be (first, longest) seconds > 0, first <="
                             f" longest, not {retry_seconds!r}")
        self.folder = Path(folder)
        self.keyring = keyring
        self._segment_max = segment_max_bytes
        self._flush_interval = float(flush_interval)
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = float(checkpoint_seconds)
        self._max_pending = max_pending
        self._batch_max = min(4096, max_pending)
        self._retry_first, self._retry_max = float(retry_seconds[0]), float(retry_seconds[1])

        if not self.folder.exists():
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.folder, 0o700)
        self._lock_fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AuditTrailError(f"audit trail {self.folder} is open in another process") from None
        self._fd = -1
        try:
            last_seq, self._prev, number, self.recovered, closed = _recover(self.folder)
            self._open_segment(number)
        except BaseException:
            self._release()
            raise
        # shared state, guarded by _lock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)   # the writer waits here
        self._done = threading.Condition(self._lock)   # flush() / back-pressure wait here
        self._queue: list[tuple[int, int, int, bytes]] = []  # (seq, time_ns, type, body)
        self._on_durable: dict[int, Callable[[], None]] = {}
        self._seq = last_seq
        self._durable = last_seq
        self._flush_target = last_seq
        self._first_pending = 0.0
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self._fault: str | None = None   # why the trail cannot be written now
        self._fault_since = 0.0
        # writer-only state; _good is that state at the last commit that reached the disk
        self._written = last_seq
        self._unsigned = 0
        self._first_unsigned = 0.0
        self._good = (last_seq, self._prev, 0, 0.0)
        self._aead: dict[str, AESGCM] = {}
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        try:
            self._append(CONTROL, json.dumps({
                "event": "open", "segment": self.segment.name, "previous_closed": closed,
                "recovered": [t.as_dict() for t in self.recovered]}).encode(), sync=True)
        except AuditTrailError:  # cannot even write the open record: do not start
            with self._lock:
                self._closed = self._stopping = True
                self._work.notify()
            self._thread.join()
            self._release()
            raise
        LOG.info("audit trail %s open: segment %s, next seq %d%s", self.folder, self.segment.name,
                 self._seq + 1, "" if closed or last_seq == 0 else
                 " (previous run did not close the trail)")

    # -- public API ------------------------------------------------------------------

    def append(self, body: bytes | Mapping[str, Any], *, sync: bool = False,
               on_durable: Callable[[], None] | None = None) -> int:
        """Queue one record; returns its sequence number.

        ``body`` is a JSON object, as a mapping or as UTF-8 JSON bytes (bytes are only
        checked to look like an object, ``{...}``: they are the caller's promise). Returns at once;
        the record is on disk after the next group commit, or before returning with
        ``sync=True``. ``on_durable`` is called (in the writer thread, once) when the
        record is on disk, even when that happens only after a write failure was
        overcome and the ``sync=True`` caller was already told that it was not.

        Raises :class:`~dicomnode.audit.frames.AuditUnavailableError` when the trail
        cannot be written now and the record would have to wait for it: with
        ``sync=True`` (the record is then not queued), or when ``max_pending``
        records are held already.
        """
        if isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
            stripped = data.strip()  # a cheap shape check; parsing would double the cost
            if not (stripped.startswith(b"{") and stripped.endswith(b"}")):
                raise ValueError("body: bytes must be a UTF-8 JSON object")
        elif isinstance(body, Mapping):
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            raise TypeError(f"body: expected a mapping or JSON bytes, not {type(body).__name__}")
        if len(data) > MAX_BODY:
            raise ValueError(f"body: {len(data)} bytes is more than {MAX_BODY}")
        return self._append(DATA, data, sync=sync, on_durable=on_durable)

    def flush(self) -> None:
        """Wait until every record appended so far is written and fsync'd; raises
        :class:`~dicomnode.audit.frames.AuditUnavailableError` while it cannot be."""
        with self._lock:
            self._wait_durable(self._seq)

    def wait_durable(self, seq: int) -> None:
        """Wait until record ``seq`` (and every one before it) is on disk; raises
        :class:`~dicomnode.audit.frames.AuditUnavailableError` while it cannot be
        (the record stays queued)."""
        with self._lock:
            self._wait_durable(seq)

    def health(self) -> tuple[bool, str]:
        """``(ok, detail)``: whether records can be written now (for ``/readyz``)."""
        with self._lock:
            if self._error is not None:
                return False, f"audit writer failed: {self._error}"
            if self._fault is not None:
                return False, (f"audit trail cannot be written since "
                               f"{time.monotonic() - self._fault_since:.0f} s ({self._fault});"
                               f" new work is refused until it can")
            if self._stopping:
                return False, "audit trail closed"
            return True, f"audit trail writable (seq {self._durable})"

    def close(self) -> None:
        """Write a final checkpoint, stop the writer, release the folder. Idempotent.

        Raises :class:`AuditTrailError` when records could not be written (the trail was
        unavailable at the end): they are lost with the process, and the next start-up
        finds the trail not closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._work.notify()
        self._thread.join()
        self._release()
        if self._error is not None:
            raise AuditTrailError(f"audit writer failed: {self._error}") from self._error
        LOG.info("audit trail %s closed at seq %d", self.folder, self._seq)

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record appended (durable or not)."""
        return self._seq

    @property
    def segment(self) -> Path:
        """The segment being written."""
        return self._segment

    # -- internals -------------------------------------------------------------------

    def _append(self, rtype: int, data: bytes, *, sync: bool,
                on_durable: Callable[[], None] | None = None) -> int:
        with self._lock:
            self._raise_if_failed()
            if self._stopping:
                raise AuditTrailError(f"audit trail {self.folder} is closed")
            if self._fault is not None and sync:
                raise self._unavailable()
            while len(self._queue) >= self._max_pending:
                if self._fault is not None:
                    raise self._unavailable()
                self._done.wait()
                self._raise_if_failed()
            seq = self._enqueue(rtype, data)
            if on_durable is not None:
                self._on_durable[seq] = on_durable
            if sync:
                self._wait_durable(seq)
        return seq

    def _enqueue(self, rtype: int, data: bytes) -> int:
        """Called with the lock held."""
        self._seq += 1
        self._queue.append((self._seq, time.time_ns(), rtype, data))
        n = len(self._queue)
        if n == 1:
            self._first_pending = time.monotonic()
            self._work.notify()
        elif n == self._batch_max:
            self._work.notify()
        return self._seq

    def _unavailable(self) -> AuditUnavailableError:
        return AuditUnavailableError(f"audit trail {self.folder} cannot be written now:"
                                     f" {self._fault}")

    def _wait_durable(self, seq: int) -> None:
        """Called with the lock held."""
        if self._durable >= seq:
            return
        self._flush_target = max(self._flush_target, seq)
        self._work.notify()
        while self._durable < seq:
            self._raise_if_failed()
            if self._fault is not None:
                raise self._unavailable()
            self._done.wait()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AuditTrailError(f"audit writer failed: {self._error}") from self._error
        if self._closed and not self._thread.is_alive() and self._durable < self._seq:
            raise AuditTrailError("audit trail closed with records not written")

    def _run(self) -> None:
        delay = self._retry_first
        try:
            while True:
                with self._lock:
                    if self._fault is not None:
                        if not self._stopping:  # a close() tries once more at once
                            self._work.wait(delay)
                    else:
                        self._wait_for_work()
                    batch, self._queue = self._queue, []
                    stopping = self._stopping
                    faulted = self._fault is not None
                    if batch:
                        self._done.notify_all()  # room for blocked appends
                try:
                    if faulted:
                        self._repair()
                    self._write(batch, final=stopping)
                except OSError as exc:
                    self._failed(batch, exc)
                    if stopping:
                        raise AuditTrailError(f"{self._seq - self._durable} record(s) could"
                                              f" not be written: {exc.strerror or exc}") from exc
                    delay = self._retry_first if not faulted else min(delay * 2, self._retry_max)
                    continue
                if faulted:
                    self._recovered()
                delay = self._retry_first
                if stopping:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to every caller
            LOG.exception("audit writer for %s failed; no further records can be written",
                          self.folder)
            with self._lock:
                self._error = exc
                self._done.notify_all()

    def _wait_for_work(self) -> None:
        """Called with the lock held: wait for records (lingering for a group commit)
        or for a checkpoint that is due."""
        while not self._queue and not self._stopping:
            due = self._checkpoint_due()
            if due is not None and due <= 0:
                break
            self._work.wait(due)
        if self._queue and not self._stopping:  # linger: group commit
            deadline = self._first_pending + self._flush_interval
            while (self._flush_target <= self._durable and not self._stopping
                   and len(self._queue) < self._batch_max):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._work.wait(remaining)

    def _failed(self, batch: list[tuple[int, int, int, bytes]], exc: OSError) -> None:
        """A write failed: back to the last commit on disk, hold what is not written."""
        good_seq, self._prev, self._unsigned, self._first_unsigned = self._good
        self._written = good_seq
        held = [r for r in batch if r[0] > good_seq]
        reason = f"{exc.strerror or exc}" + (f" [errno {exc.errno}]" if exc.errno else "")
        with self._lock:
            self._queue[:0] = held
            first = self._fault is None
            if first:
                self._fault, self._fault_since = reason, time.monotonic()
                self._enqueue(CONTROL, json.dumps({
                    "event": "write_failed", "segment": self.segment.name, "error": reason,
                    "held_from_seq": good_seq + 1}).encode())
            self._done.notify_all()  # sync waiters learn that it is unavailable
        if first:
            LOG.error("audit trail %s cannot be written (%s): %d record(s) held in memory;"
                      " new work is refused until the trail can be written again; retrying",
                      self.folder, reason, len(held))

    def _repair(self) -> None:
        """Cut the segment back to its last commit (bytes never reported durable)."""
        st = os.fstat(self._fd)
        if st.st_size != self._size:
            os.ftruncate(self._fd, self._size)
            LOG.warning("audit segment %s: removed %d byte(s) of records whose write failed"
                        " (they are written again from memory)", self.segment.name,
                        st.st_size - self._size)
        os.fdatasync(self._fd)

    def _recovered(self) -> None:
        with self._lock:
            since, self._fault = self._fault_since, None
        LOG.warning("audit trail %s can be written again after %.1f s; the records held were"
                    " written", self.folder, time.monotonic() - since)

    def _checkpoint_due(self) -> float | None:
        if not self._unsigned:
            return None
        return self._first_unsigned + self._checkpoint_seconds - time.monotonic()

    def _write(self, batch: list[tuple[int, int, int, bytes]], *, final: bool) -> None:
        out: list[bytes] = []
        size = self._size
        nonces = os.urandom(NONCE_LEN * len(batch))
        for i, (seq, time_ns, rtype, data) in enumerate(batch):
            if rtype == DATA:
                key_id = self.keyring.current_key_id
                aead = self._aead.get(key_id)
                if aead is None:
                    aead = self._aead[key_id] = AESGCM(self.keyring.data_key(key_id))
                frame, self._prev = _encode(DATA, seq, time_ns, self._prev, key_id,
                                            nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN], data, aead)
            else:
                frame, self._prev = _encode(rtype, seq, time_ns, self._prev, "", b"", data)
            out.append(frame)
            self._written = seq
            size += len(frame)
            if not self._unsigned:
                self._first_unsigned = time.monotonic()
            self._unsigned += 1
            if self._unsigned >= self._checkpoint_every:
                size += self._checkpoint(out, seq, final=False)
            if size >= self._segment_max:
                if self._unsigned:
                    self._checkpoint(out, seq, final=False)
                self._commit(out)
                out = []
                self._open_segment(self._number + 1)
                size = 0
        due = self._checkpoint_due()
        if final or (due is not None and due <= 0):
            self._checkpoint(out, self._written, final=final)
        self._commit(out)
        if final:
            os.close(self._fd)
            self._fd = -1

    def _checkpoint(self, out: list[bytes], seq: int, *, final: bool) -> int:
        key = self.keyring.signing_key
        signer = key_fingerprint(key.public_key())
        time_ns = time.time_ns()
        signature = key.sign(_signed_message(seq, time_ns, self._prev, signer, final))
        body = json.dumps({"signer": signer, "final": final,
                           "signature": base64.b64encode(signature).decode("ascii")}).encode()
        frame, self._prev = _encode(CHECKPOINT, seq, time_ns, self._prev,
                                    self.keyring.signing_key_id, b"", body)
        out.append(frame)
        self._unsigned = 0
        return len(frame)

    def _commit(self, frames: list[bytes]) -> None:
        """Write and fdatasync ``frames``; then everything encoded so far is durable."""
        if frames:
            data = b"".join(frames)
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
            self._size += len(data)
        self._good = (self._written, self._prev, self._unsigned, self._first_unsigned)
        with self._lock:
            if self._written <= self._durable:
                return
            self._durable = self._written
            due = [s for s in self._on_durable if s <= self._durable]
            callbacks = [self._on_durable.pop(s) for s in sorted(due)]
            self._done.notify_all()
        for callback in callbacks:
            try:
                callback()
            except Exception:
                LOG.exception("a callback on a durable audit record failed")

    def _open_segment(self, number: int) -> None:
        path = self.folder / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            _fsync_dir(self.folder)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segment, self._number, self._size = path, number, 0

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = -1


__all__ = ["AuditTrail", "AuditTrailError", "AuditUnavailableError", "TornTail"]
