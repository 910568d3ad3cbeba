"""Consistent pseudonyms for de-identified destinations, and their encrypted mapping.

Each de-identified destination has its own 32-byte secret (made once, stored AES-256-GCM
encrypted under the node's audit data key, :mod:`dicomnode.audit.keys`); every
pseudonym is a keyed hash (HMAC-SHA256) of the original under that secret:

* a UID becomes ``2.25.<128 bits of HMAC>`` (PS3.5 B.2): the same source UID always gives
  the same new UID for that destination, across restarts, so a SEG sent today still
  references the de-identified CT sent yesterday; two destinations get unrelated UIDs;
* a patient (Patient ID) becomes ``DN-`` + 12 base32 characters;
* a patient's date offset (for the Modified Dates option) is 365-4014 days back, the
  same for all of that patient's studies, so intervals are kept.

Keyed hashes cannot be reversed. To match results *coming back* from a de-identified
destination to the source study, every pseudonym handed out is recorded with its
original, AES-GCM encrypted (the pseudonym and destination are the associated data), in
``<storage>/deidentify/pseudonyms.sqlite3``: :meth:`PseudonymStore.original` answers
"which source UID/patient is this pseudonym" with the data keys, and the file alone
reveals nothing. Records written under an older data key stay readable after
``dicomnode keys rotate`` (the key ID is stored with each record).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomnode.core.db import ThreadLocalSQLite
from dicomnode.errors import DicomNodeError

LOG = logging.getLogger(__name__)

DIRNAME = "deidentify"
DB_FILENAME = "pseudonyms.sqlite3"
Kind = Literal["uid", "patient"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    destination TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    secret BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pseudonyms (
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    key_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    original BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (destination, kind, pseudonym)
)
"""


class Keys(Protocol):
    """What the store needs of :class:`dicomnode.audit.keys.Keyring`."""

    @property
    def current_key_id(self) -> str: ...

    def data_key(self, key_id: str) -> bytes: ...


class PseudonymError(DicomNodeError):
    """The mapping cannot be read (no such key, a record that does not decrypt)."""


class PseudonymStore:
    """Per-destination secrets and the encrypted pseudonym -> original records."""

    def __init__(self, storage_dir: Path | str, keys: Keys) -> None:
        root = Path(storage_dir) / DIRNAME
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = root / DB_FILENAME
        self.keys = keys
        self._db = ThreadLocalSQLite(self.path, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._secrets: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        key_id = self.keys.current_key_id
        nonce = os.urandom(12)
        return key_id, nonce, AESGCM(self.keys.data_key(key_id)).encrypt(nonce, plaintext, aad)

    def _open(self, key_id: str, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(self.keys.data_key(key_id)).decrypt(nonce, sealed, aad)
        except Exception as exc:
            raise PseudonymError(f"a pseudonym record does not decrypt under key {key_id}:"
                                 f" {type(exc).__name__}") from None

    def secret(self, destination: str) -> bytes:
        """The destination's secret, made on first use."""
        with self._lock:
            if destination in self._secrets:
                return self._secrets[destination]
            aad = f"secret|{destination}".encode()
            row = self._db.conn().execute(
                "SELECT key_id, nonce, secret FROM secrets WHERE destination = ?",
                (destination,)).fetchone()
            if row is None:
                key_id, nonce, sealed = self._seal(os.urandom(32), aad)
                with self._db.transaction() as conn:
                    conn.execute("INSERT OR IGNORE INTO secrets VALUES (?,?,?,?,?)",
                                 (destination, key_id, nonce, sealed, time.time()))
                    row = conn.execute(
                        "SELECT key_id, nonce, secret FROM secrets WHERE destination = ?",
                        (destination,)).fetchone()
                LOG.info("de-identification secret created for destination %s", destination)
            secret = self._open(row[0], row[1], row[2], aad)
            self._secrets[destination] = secret
            return secret

    def remember(self, destination: str, pairs: Iterable[tuple[Kind, str, str]]) -> None:
        """Record (kind, pseudonym, original) triples, once each, in one transaction."""
        rows = []
        known = set()
        for kind, pseudonym, original in pairs:
            if (kind, pseudonym) in known:
                continue
            known.add((kind, pseudonym))
            aad = f"{destination}|{kind}|{pseudonym}".encode()
            key_id, nonce, sealed = self._seal(original.encode(), aad)
            rows.append((destination, kind, pseudonym, key_id, nonce, sealed, time.time()))
        if rows:
            with self._db.transaction() as conn:
                conn.executemany("INSERT OR IGNORE INTO pseudonyms VALUES (?,?,?,?,?,?,?)", rows)

    def original(self, destination: str, kind: Kind, pseudonym: str) -> str | None:
        """The original behind ``pseudonym`` for ``destination``, or None if never issued."""
        row = self._db.conn().execute(
            "SELECT key_id, nonce, original FROM pseudonyms WHERE destination = ? AND kind = ?"
            " AND pseudonym = ?", (destination, kind, pseudonym)).fetchone()
        if row is None:
            return None
        aad = f"{destination}|{kind}|{pseudonym}".encode()
        return self._open(row[0], row[1], row[2], aad).decode()


class Pseudonymizer:
    """The keyed functions of one destination (see the module docstring)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("secret: at least 16 bytes")
        self._secret = secret

    def _mac(self, *parts: str) -> bytes:
        return hmac.new(self._secret, "\x1f".join(parts).encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        return f"2.25.{int.from_bytes(self._mac('uid', original)[:16], 'big')}"

    def patient(self, patient_id: str, issuer: str = "") -> str:
        code = base64.b32encode(self._mac("patient", issuer, patient_id)).decode()
        return f"DN-{code[:12]}"

    def date_offset_days(self, patient_id: str, issuer: str = "") -> int:
        return 365 + int.from_bytes(self._mac("dates", issuer, patient_id)[:4], "big") % 3650
