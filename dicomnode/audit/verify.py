"""Checking and reading the audit trail, by auditors and by ``dicomnode audit``.

* :func:`verify` needs only the signing public keys: it checks every segment's framing,
  the hash chain, the numbering of records and the Ed25519 checkpoint signatures
  (RFC 8032) without decrypting, and names the first record modified, deleted,
  reordered, duplicated or truncated (a :class:`VerifyReport` of :class:`Problem` items,
  in trail order). Torn tails that a later start-up acknowledged are notes, not problems.
* :func:`read` needs the data keys: it decrypts the data records (AES-256-GCM, NIST
  SP 800-38D) between two times, for ``dicomnode audit export``.

Neither needs the writer (:mod:`dicomnode.audit.trail`) nor its lock: both read the
segment files as :mod:`dicomnode.audit.frames` defines them. ``dicomnode audit verify``
and ``audit export`` record their own use as Audit Log Used events (PS3.15 A.5.3.2).

Nothing here logs a record body: bodies carry patient identifiers (PS3.15 A.5.2.6).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomnode.audit.frames import (
    CHECKPOINT,
    CONTROL,
    DATA,
    ZERO_HASH,
    AuditTrailError,
    TornTail,
    _Bad,
    _Frame,
    _scan,
    _segment_name,
    _segments,
    _signed_message,
)
from dicomnode.audit.keys import Keyring, KeyringError, load_public_keys, public_keys_of

LOG = logging.getLogger(__name__)


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
                    gone = [_segment_name(n) for n in missing_segments
                            if prev_seg < _segment_name(n) < item.seg]
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


_Report = Callable[[ProblemKind, int, _Item, str], None]
"""``problem(kind, seq, item, message)``: records one :class:`Problem`."""


def _check_signature(f: _Frame, item: _Item, signers: dict[str, Ed25519PublicKey],
                     problem: _Report) -> bool:
    doc = _control(f)
    signer = doc.get("signer")
    key = signers.get(signer) if isinstance(signer, str) else None
    if key is None or not isinstance(signer, str):
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

def _to_datetime(time_ns: int) -> datetime:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=ns // 1000)


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


__all__ = ["Problem", "ProblemKind", "VerifyReport", "read", "verify"]
