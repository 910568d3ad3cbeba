"""The audit trail on disk: encrypted, hash-chained, signed, append-only segment files.

Segments are ``audit-000001.log``, ``audit-000002.log``, ... in one folder (0700, files
0600); a new one is started at every start-up and when the current one reaches
``segment_max_bytes``. A segment is a plain sequence of frames::

    frame   = magic "\\xd1AUD" | u32 length of payload | payload | SHA-256(payload)
    payload = header | body
    header  = u8 version (1) | u8 type | u64 seq | u64 time (ns since the epoch, UTC)
              | 32 bytes SHA-256 of the previous frame's payload (zeros for the first)
              | u8 length + key ID (ASCII) | 12-byte nonce (data records only)

All integers are big-endian. Types:

* 1 data: body = AES-256-GCM ciphertext + tag (NIST SP 800-38D) of the caller's JSON,
  under the data key named in the header, with a random 96-bit nonce and the whole
  header as associated data;
* 2 checkpoint: body = JSON ``{"signer": <key fingerprint>, "final": bool,
  "signature": <base64>}``, an Ed25519 signature (RFC 8032) over the header's seq, time
  and previous hash; its seq is the seq of the record it covers (checkpoints take no
  number of their own); the key ID names the signing key (``s1``);
* 3 control: body = plain JSON written by the trail itself (no patient data): at each
  start-up ``{"event": "open", "recovered": [torn tails...], "previous_closed": bool}``.

Data and control records are numbered 1, 2, 3, ... without gaps, across segments and
restarts. The trailing hash is both the frame's checksum (a torn or damaged frame does
not match it) and the link of the chain (the next frame carries it as its previous
hash). So with the public keys alone, :func:`verify` proves every record up to the last
valid checkpoint unchanged, and checks the chain after it, without decrypting.

Durability: :meth:`AuditTrail.append` queues the record and returns its sequence number;
one writer thread encrypts, writes and ``fdatasync``'s whole batches (group commit).
:meth:`AuditTrail.flush` (or ``append(..., sync=True)``) waits until it is on disk.
After a crash, the start-up finds the last complete valid frame; bytes after it (a torn
write) are logged with segment and offset, copied to ``quarantine/`` and named in the
new segment's ``open`` record, which :func:`verify` accepts as an acknowledgement. The
segment itself is never rewritten.

Nothing here logs a record body: bodies carry patient identifiers (PS3.15 A.5.2.6).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomnode.audit.keys import (
    Keyring,
    KeyringError,
    key_fingerprint,
    load_public_keys,
    public_keys_of,
)
from dicomnode.errors import DicomNodeError
from dicomnode.fsutil import fsync_dir as _fsync_dir

LOG = logging.getLogger(__name__)

MAGIC = b"\xd1AUD"
VERSION = 1
DATA, CHECKPOINT, CONTROL = 1, 2, 3
_FRAME = struct.Struct(">4sI")
_HEADER = struct.Struct(">BBQQ32sB")
HASH_LEN = 32
NONCE_LEN = 12
ZERO_HASH = bytes(HASH_LEN)
MAX_BODY = 16 * 1024 * 1024
_MIN_FRAME = _FRAME.size + _HEADER.size + HASH_LEN
_SEGMENT_RE = re.compile(r"^audit-(\d{6,})\.log$")
_SIGN_CONTEXT = b"dicomnode audit checkpoint v1\x00"


class AuditTrailError(DicomNodeError):
    """The audit trail cannot be written or read (in use, writer failed, damaged record)."""


# -- frames ------------------------------------------------------------------------

@dataclass(slots=True)
class _Frame:
    offset: int
    end: int
    type: int
    seq: int
    time_ns: int
    prev_hash: bytes
    key_id: str
    nonce: bytes
    header: bytes
    body: bytes
    hash: bytes


@dataclass(slots=True)
class _Bad:
    """Bytes at ``offset..end`` that are no valid frame."""

    offset: int
    end: int
    at_eof: bool
    complete: bool  # magic and length fit exactly: a whole frame whose hash does not match
    guess: tuple[int, int] | None  # (type, seq) read from a complete frame's header, unchecked


def _decode(buf: bytes, offset: int, end: int, payload: bytes, digest: bytes) -> _Frame | None:
    if len(payload) < _HEADER.size:
        return None
    version, rtype, seq, time_ns, prev, klen = _HEADER.unpack_from(payload)
    pos = _HEADER.size + klen
    nonce = b""
    if rtype == DATA:
        nonce = payload[pos:pos + NONCE_LEN]
        pos += NONCE_LEN
    if version != VERSION or rtype not in (DATA, CHECKPOINT, CONTROL) or pos > len(payload):
        return None
    try:
        key_id = payload[_HEADER.size:_HEADER.size + klen].decode("ascii")
    except UnicodeDecodeError:
        return None
    return _Frame(offset, end, rtype, seq, time_ns, prev, key_id, nonce, payload[:pos],
                  payload[pos:], digest)


def _frame_at(buf: bytes, pos: int, *, check: bool = True) -> _Frame | None:
    """The valid frame starting at ``pos``, or None."""
    if len(buf) - pos < _MIN_FRAME:
        return None
    magic, length = _FRAME.unpack_from(buf, pos)
    end = pos + _FRAME.size + length + HASH_LEN
    if magic != MAGIC or length > MAX_BODY + 512 or end > len(buf):
        return None
    payload = buf[pos + _FRAME.size:end - HASH_LEN]
    digest = buf[end - HASH_LEN:end]
    if check and hashlib.sha256(payload).digest() != digest:
        return None
    return _decode(buf, pos, end, payload, digest)


def _scan(buf: bytes) -> list[_Frame | _Bad]:
    """Every frame of a segment in order; damaged stretches become :class:`_Bad` items."""
    items: list[_Frame | _Bad] = []
    pos = 0
    while pos < len(buf):
        frame = _frame_at(buf, pos)
        if frame is not None:
            items.append(frame)
            pos = frame.end
            continue
        nxt = buf.find(MAGIC, pos + 1)
        while nxt != -1 and _frame_at(buf, nxt) is None:
            nxt = buf.find(MAGIC, nxt + 1)
        end = len(buf) if nxt == -1 else nxt
        unchecked = _frame_at(buf[:end], pos, check=False)
        complete = unchecked is not None and unchecked.end == end
        items.append(_Bad(pos, end, nxt == -1, complete, _peek(buf, pos, end)))
        pos = end
    return items


def _peek(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """``(type, seq)`` from the header of a damaged or torn frame, unchecked."""
    if end - pos < _FRAME.size + _HEADER.size or buf[pos:pos + 4] != MAGIC:
        return None
    version, rtype, seq, *_ = _HEADER.unpack_from(buf, pos + _FRAME.size)
    return (rtype, seq) if version == VERSION else None


def _encode(rtype: int, seq: int, time_ns: int, prev: bytes, key_id: str, nonce: bytes,
            body: bytes, aead: AESGCM | None = None) -> tuple[bytes, bytes]:
    """``(frame, hash)``; with ``aead`` the body is encrypted with the header as AAD."""
    kid = key_id.encode("ascii")
    header = _HEADER.pack(VERSION, rtype, seq, time_ns, prev, len(kid)) + kid + nonce
    if aead is not None:
        body = aead.encrypt(nonce, body, header)
    payload = header + body
    digest = hashlib.sha256(payload).digest()
    return _FRAME.pack(MAGIC, len(payload)) + payload + digest, digest


def _signed_message(seq: int, time_ns: int, prev: bytes, signer: str, final: bool) -> bytes:
    return (_SIGN_CONTEXT + struct.pack(">QQ?", seq, time_ns, final) + prev
            + signer.encode("ascii"))


def _segments(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for path in folder.glob("audit-*.log"):
        if m := _SEGMENT_RE.match(path.name):
            out.append((int(m.group(1)), path))
    return sorted(out)




def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _to_datetime(time_ns: int) -> datetime:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=ns // 1000)


# -- recovery ----------------------------------------------------------------------

@dataclass(frozen=True)
class TornTail:
    """Bytes after the last valid record of a segment, found at start-up (a torn write)."""

    segment: str
    offset: int
    length: int
    sha256: str
    quarantine: str  # path relative to the trail folder

    def as_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "offset": self.offset, "length": self.length,
                "sha256": self.sha256, "quarantine": self.quarantine}


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
        path = self.folder / f"audit-{number:06d}.log"
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


# -- verification ------------------------------------------------------------------

ProblemKind = Literal["torn", "modified", "chain_broken", "deleted", "reordered", "duplicate",
                      "bad_signature", "unknown_signer"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the trail, located as precisely as the bytes allow."""

    kind: ProblemKind
    seq: int
    segment: str
    offset: int
    message: str

    def __str__(self) -> str:
        return f"{self.segment} @ {self.offset}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` when there is no problem (notes are not problems)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: int = 0
    records: int = 0
    checkpoints: int = 0
    last_seq: int = 0
    signed_through: int = 0  # seq covered by the last valid checkpoint before any problem
    acknowledged_torn: list[TornTail] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        """The first problem in trail order: the first record modified, deleted, ..."""
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        head = (f"audit trail {'OK' if self.ok else 'DAMAGED'}: {self.records} records in "
                f"{self.segments} segments, last seq {self.last_seq}, {self.checkpoints} "
                f"checkpoints, signed through seq {self.signed_through}")
        return "\n".join([head] + [f"  PROBLEM {p}" for p in self.problems]
                         + [f"  note: {n}" for n in self.notes])


@dataclass(slots=True)
class _Item:
    seg: str
    offset: int
    frame: _Frame | None
    bad: _Bad | None = None
    torn: bool = False


def verify(folder: Path | str, public_keys: Mapping[str, Ed25519PublicKey]
           | Iterable[Ed25519PublicKey] | Path | str) -> VerifyReport:
    """Check framing, hash chain, numbering and checkpoint signatures, without decrypting.

    ``public_keys``: the signing public keys (a mapping or iterable of keys, or a path to
    a ``*.pub.pem`` file or a folder of them). Problems are listed in trail order, so
    ``report.first`` names the first record modified, deleted, reordered or truncated.
    """
    if isinstance(public_keys, str | Path):
        public_keys = load_public_keys(public_keys)
    signers = public_keys_of(public_keys)
    folder = Path(folder)
    report = VerifyReport()
    segments = _segments(folder)
    report.segments = len(segments)
    numbers = [n for n, _ in segments]
    missing_segments = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)) if numbers else []
    items: list[_Item] = []
    tails: list[tuple[_Item, bytes]] = []
    acks: dict[tuple[str, int, int, str], TornTail] = {}
    for _, path in segments:
        buf = path.read_bytes()
        for it in _scan(buf):
            if isinstance(it, _Frame):
                items.append(_Item(path.name, it.offset, it))
                if it.type == CONTROL:
                    for t in _control(it).get("recovered", []):
                        tail = TornTail(**t)
                        acks[(tail.segment, tail.offset, tail.length, tail.sha256)] = tail
            else:
                item = _Item(path.name, it.offset, None, it, torn=it.at_eof and not it.complete)
                items.append(item)
                if it.at_eof:
                    tails.append((item, buf[it.offset:]))
    for item, data in tails:
        assert item.bad is not None
        key = (item.seg, item.offset, len(data), hashlib.sha256(data).hexdigest())
        if key in acks:
            items.remove(item)
            report.acknowledged_torn.append(acks[key])
            report.notes.append(f"torn tail of {len(data)} bytes at offset {item.offset} of "
                                f"{item.seg} (a crash), copied to {acks[key].quarantine} and "
                                "acknowledged at the next start-up")
    _check_order(items, report, signers, missing_segments)
    if missing_segments and not any(p.kind == "deleted" for p in report.problems):
        report.notes.append(f"segment numbers missing: {missing_segments} (no record missing)")
    if report.last_seq > report.signed_through and report.ok:
        report.notes.append(f"records {report.signed_through + 1}..{report.last_seq} are not "
                            "covered by a checkpoint signature yet (trail open, or not closed "
                            "cleanly)")
    return report


def _control(frame: _Frame) -> dict[str, Any]:
    try:
        doc = json.loads(frame.body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _check_order(items: list[_Item], report: VerifyReport, signers: dict[str, Ed25519PublicKey],
                 missing_segments: list[int]) -> None:
    where: dict[int, _Item] = {}          # seq -> first data/control record with it
    last_hash: dict[int, bytes] = {}      # seq -> hash of the last frame carrying it
    for item in items:
        f = item.frame
        if f is not None:
            if f.type != CHECKPOINT:
                where.setdefault(f.seq, item)
            last_hash[f.seq] = f.hash
    seen: set[int] = set()
    displaced: set[int] = set()
    prev_seq = 0
    prev_hash: bytes | None = ZERO_HASH
    prev_seg = items[0].seg if items else ""

    def problem(kind: ProblemKind, seq: int, item: _Item, message: str) -> None:
        report.problems.append(Problem(kind, seq, item.seg, item.offset, message))

    def link(f: _Frame, pred_hash: bytes | None, item: _Item) -> None:
        if pred_hash is not None and f.prev_hash != pred_hash:
            what = (f"checkpoint at seq {f.seq} does not follow record {f.seq}"
                    if f.type == CHECKPOINT else
                    f"hash chain broken at seq {f.seq} (record {f.seq - 1} modified or deleted?)")
            problem("chain_broken", f.seq, item, what)

    for item in items:
        f = item.frame
        if f is None:  # a damaged stretch: guess which record it was
            assert item.bad is not None
            kind, seq = item.bad.guess or (DATA, prev_seq + 1)
            if not (kind == CHECKPOINT and seq == prev_seq) and not (
                    kind != CHECKPOINT and seq == prev_seq + 1):
                kind, seq = DATA, prev_seq + 1
            size = item.bad.end - item.offset
            label = "checkpoint at seq" if kind == CHECKPOINT else "record seq"
            if item.torn:
                problem("torn", seq, item, f"torn record at offset {item.offset} of segment "
                        f"{item.seg} ({size} bytes, {label} {seq}; truncated?)")
            elif item.bad.complete:
                problem("modified", seq, item, f"{label} {seq} modified (its hash does not match "
                        "its bytes)")
            else:
                problem("modified", seq, item, f"{label} {seq} unreadable at offset "
                        f"{item.offset} ({size} bytes): framing damaged")
            if kind != CHECKPOINT:
                seen.add(seq)
            prev_seq, prev_hash, prev_seg = seq, None, item.seg
            continue
        report.last_seq = max(report.last_seq, f.seq)
        expected = prev_seq if f.type == CHECKPOINT else prev_seq + 1
        if f.seq == expected:
            link(f, prev_hash, item)
        elif f.type == CHECKPOINT:
            if f.seq > prev_seq:
                problem("deleted", prev_seq + 1, item, f"checkpoint for seq {f.seq} follows seq "
                        f"{prev_seq} (records {prev_seq + 1}..{f.seq} deleted)")
            else:
                problem("reordered", f.seq, item, f"checkpoint for seq {f.seq} found after seq "
                        f"{prev_seq} (moved?)")
        elif f.seq > expected:
            gap = range(expected, f.seq) if f.seq - expected < 1_000_000 else range(expected, expected + 1)
            missing = [s for s in gap if s not in seen]
            later = [s for s in missing if s in where]
            absent = [s for s in missing if s not in where]
            if later:
                other = where[later[0]]
                problem("reordered", later[0], item, f"records reordered: seq {f.seq} found where "
                        f"seq {later[0]} was expected (seq {later[0]} is at {other.seg} offset "
                        f"{other.offset})")
                displaced.update(later)
            if absent:
                lost = (f"record {absent[0]}" if len(absent) == 1
                        else f"records {absent[0]}..{absent[-1]}")
                hint = ""
                if item.seg != prev_seg:
                    gone = [f"audit-{n:06d}.log" for n in missing_segments
                            if prev_seg < f"audit-{n:06d}.log" < item.seg]
                    hint = f"; segment {', '.join(gone)} missing" if gone else ""
                problem("deleted", absent[0], item, f"sequence goes from {absent[0] - 1} to "
                        f"{f.seq} ({lost} deleted{hint})")
            if not missing:
                link(f, last_hash.get(f.seq - 1), item)
        elif f.seq in seen:
            first = where.get(f.seq)
            problem("duplicate", f.seq, item, f"record seq {f.seq} appears a second time"
                    + (f" (first at {first.seg} offset {first.offset})" if first else ""))
        else:
            if f.seq not in displaced:
                problem("reordered", f.seq, item, f"records reordered: seq {f.seq} found after "
                        f"seq {prev_seq}")
            link(f, last_hash.get(f.seq - 1), item)
        if f.type == CHECKPOINT:
            report.checkpoints += 1
            if _check_signature(f, item, signers, problem) and not report.problems:
                report.signed_through = f.seq
        else:
            report.records += 1
            seen.add(f.seq)
        prev_seq, prev_hash, prev_seg = f.seq, f.hash, item.seg


def _check_signature(f: _Frame, item: _Item, signers: dict[str, Ed25519PublicKey],
                     problem: Any) -> bool:
    doc = _control(f)
    signer = doc.get("signer")
    key = signers.get(signer) if isinstance(signer, str) else None
    if key is None:
        problem("unknown_signer", f.seq, item, f"checkpoint at seq {f.seq} is signed by key "
                f"{f.key_id} ({signer}), which is not among the public keys given")
        return False
    try:
        signature = base64.b64decode(doc.get("signature", ""), validate=True)
        key.verify(signature, _signed_message(f.seq, f.time_ns, f.prev_hash, signer,
                                              bool(doc.get("final"))))
    except (InvalidSignature, ValueError, TypeError):
        problem("bad_signature", f.seq, item, f"signature of checkpoint at seq {f.seq} invalid")
        return False
    return True


# -- reading -----------------------------------------------------------------------

def read(folder: Path | str, keyring: Keyring, since: datetime | None = None,
         until: datetime | None = None, *, errors: Literal["raise", "skip"] = "raise",
         ) -> Iterator[tuple[int, datetime, dict[str, Any]]]:
    """Decrypt the data records: ``(seq, time (UTC), body)`` in trail order.

    ``since`` (inclusive) and ``until`` (exclusive) are timezone-aware datetimes. Records
    under old key IDs decrypt as long as the keyring still holds those keys. A damaged
    record raises :class:`AuditTrailError` (``errors="skip"``: logged and skipped); torn
    tails are skipped with a warning. This does not check the chain: use :func:`verify`.
    """
    for name, value in (("since", since), ("until", until)):
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise ValueError(f"{name}: must be a timezone-aware datetime, not {value!r}")
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors: must be 'raise' or 'skip', not {errors!r}")
    lo = int(since.timestamp() * 1e9) if since else None
    hi = int(until.timestamp() * 1e9) if until else None
    aeads: dict[str, AESGCM] = {}
    for _, path in _segments(Path(folder)):
        for it in _scan(path.read_bytes()):
            if isinstance(it, _Bad):
                msg = f"{path.name} @ {it.offset}: {it.end - it.offset} bytes are no valid record"
                if it.at_eof and not it.complete:
                    LOG.warning("%s (torn tail), skipped", msg)
                    continue
                if errors == "raise":
                    raise AuditTrailError(msg)
                LOG.error("%s, skipped", msg)
                continue
            if it.type != DATA or (lo is not None and it.time_ns < lo) or (
                    hi is not None and it.time_ns >= hi):
                continue
            try:
                aead = aeads.get(it.key_id)
                if aead is None:
                    aead = aeads[it.key_id] = AESGCM(keyring.data_key(it.key_id))
                body = json.loads(aead.decrypt(it.nonce, it.body, it.header))
            except (InvalidTag, KeyringError, ValueError) as exc:
                msg = (f"{path.name} @ {it.offset}: record seq {it.seq} cannot be decrypted "
                       f"under key {it.key_id} ({type(exc).__name__})")
                if errors == "raise":
                    raise AuditTrailError(msg) from None
                LOG.error("%s, skipped", msg)
                continue
            yield it.seq, _to_datetime(it.time_ns), body
