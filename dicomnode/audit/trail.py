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
from collections.abc import Mapping
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
    the disk stalls).
    """

    def __init__(self, folder: Path | str, keyring: Keyring, *,
                 segment_max_bytes: int = 16 * 1024 * 1024, flush_interval: float = 0.05,
                 checkpoint_every: int = 1000, checkpoint_seconds: float = 60.0,
                 max_pending: int = 100_000) -> None:
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
        self.folder = Path(folder)
        self.keyring = keyring
        self._segment_max = segment_max_bytes
        self._flush_interval = float(flush_interval)
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = float(checkpoint_seconds)
        self._max_pending = max_pending
        self._batch_max = min(4096, max_pending)

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
        self._seq = last_seq
        self._durable = last_seq
        self._flush_target = last_seq
        self._first_pending = 0.0
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        # writer-only state
        self._written = last_seq
        self._unsigned = 0
        self._first_unsigned = 0.0
        self._aead: dict[str, AESGCM] = {}
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        self._append(CONTROL, json.dumps({
            "event": "open", "segment": self.segment.name, "previous_closed": closed,
            "recovered": [t.as_dict() for t in self.recovered]}).encode(), sync=True)
        LOG.info("audit trail %s open: segment %s, next seq %d%s", self.folder, self.segment.name,
                 self._seq + 1, "" if closed or last_seq == 0 else
                 " (previous run did not close the trail)")

    # -- public API ------------------------------------------------------------------

    def append(self, body: bytes | Mapping[str, Any], *, sync: bool = False) -> int:
        """Queue one record; returns its sequence number.

        ``body`` is a JSON object, as a mapping or as UTF-8 JSON bytes (bytes are only
        checked to look like an object, ``{...}``: they are the caller's promise). Returns at once;
        the record is on disk after the next group commit, or before returning with
        ``sync=True``.
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
        return self._append(DATA, data, sync=sync)

    def flush(self) -> None:
        """Wait until every record appended so far is written and fsync'd."""
        with self._lock:
            self._wait_durable(self._seq)

    def close(self) -> None:
        """Write a final checkpoint, stop the writer, release the folder. Idempotent."""
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

    def _append(self, rtype: int, data: bytes, *, sync: bool) -> int:
        with self._lock:
            self._raise_if_failed()
            if self._stopping:
                raise AuditTrailError(f"audit trail {self.folder} is closed")
            while len(self._queue) >= self._max_pending:
                self._done.wait()
                self._raise_if_failed()
            self._seq += 1
            seq = self._seq
            self._queue.append((seq, time.time_ns(), rtype, data))
            n = len(self._queue)
            if n == 1:
                self._first_pending = time.monotonic()
                self._work.notify()
            elif n == self._batch_max:
                self._work.notify()
            if sync:
                self._wait_durable(seq)
        return seq

    def _wait_durable(self, seq: int) -> None:
        """Called with the lock held."""
        if self._durable >= seq:
            return
        self._flush_target = max(self._flush_target, seq)
        self._work.notify()
        while self._durable < seq:
            self._raise_if_failed()
            self._done.wait()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AuditTrailError(f"audit writer failed: {self._error}") from self._error
        if self._closed and not self._thread.is_alive() and self._durable < self._seq:
            raise AuditTrailError("audit trail closed with records not written")

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
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
                    batch, self._queue = self._queue, []
                    stopping = self._stopping
                    if batch:
                        self._done.notify_all()  # room for blocked appends
                self._write(batch, final=stopping)
                with self._lock:
                    if batch:
                        self._durable = batch[-1][0]
                    self._done.notify_all()
                if stopping:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to every caller
            LOG.exception("audit writer for %s failed; no further records can be written",
                          self.folder)
            with self._lock:
                self._error = exc
                self._done.notify_all()

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
        if frames:
            data = b"".join(frames)
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
            self._size += len(data)

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.folder / _segment_name(number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                           | os.O_CLOEXEC, 0o600)
        _fsync_dir(self.folder)
        self._segment, self._number, self._size = path, number, 0

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = -1


__all__ = ["AuditTrail", "AuditTrailError", "TornTail"]
