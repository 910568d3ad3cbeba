"""The on-disk format of the audit trail: segment files, frames, the hash chain.

This is the one definition of the format, shared by the writer
(:mod:`dicomnode.audit.trail`) and the verifier and reader (:mod:`dicomnode.audit.verify`).
Names with a leading underscore are internal to the audit package: the format is no
public API, and only those two modules (and the tests that damage trails on purpose)
use them.

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
  start-up ``{"event": "open", "recovered": [torn tails...], "previous_closed": bool}``;
  after a write failure the writer overcame without a restart ``{"event":
  "write_failed", "error": ..., "held_from_seq": n}`` (records from ``n`` on were held in
  memory and written once the trail could be written again).

Data and control records are numbered 1, 2, 3, ... without gaps, across segments and
restarts. The trailing hash is both the frame's checksum (a torn or damaged frame does
not match it) and the link of the chain (the next frame carries it as its previous
hash). So with the public keys alone, :func:`dicomnode.audit.verify.verify` proves every
record up to the last valid checkpoint unchanged, and checks the chain after it, without
decrypting.

A start-up that finds a torn tail (see :mod:`dicomnode.audit.trail`) names it as a
:class:`TornTail` in its ``open`` control record.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomnode.errors import DicomNodeError, StorageUnavailableError

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


class AuditUnavailableError(AuditTrailError, StorageUnavailableError):
    """The trail cannot write now (disk full, I/O error); the writer retries by itself.

    A :class:`~dicomnode.errors.StorageUnavailableError`: the doors answer it with
    0xA700 (C-STORE) or 503 (HTTP) and the sender retries later."""


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


def _segment_name(number: int) -> str:
    """The file name of segment ``number`` (``audit-000001.log``); :data:`_SEGMENT_RE` reads it."""
    return f"audit-{number:06d}.log"


# -- recovery records ----------------------------------------------------------------

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
