"""The audit key folder: AES-256-GCM data keys and Ed25519 signing keys.

Layout of the folder (``storage/keys`` by default; 0700, every file 0600)::

    keys/
      data-k1.json          {"key_id": "k1", "algorithm": "AES-256-GCM",
                             "created": "2026-05-09T07:35:25Z", "key": "<base64, 32 bytes>"}
      data-k2.json          after ``rotate()``: the highest number is the current key
      signing-s1.pem        Ed25519 private key, PKCS#8 PEM (RFC 8410), unencrypted
      signing-s1.pub.pem    its public key, SubjectPublicKeyInfo PEM (RFC 8410): hand this
                            to an auditor, who can then verify checkpoints (RFC 8032) but
                            cannot decrypt anything

Data keys encrypt audit records (AES-GCM, NIST SP 800-38D); old data keys stay for
reading after rotation. Signing keys sign the trail's checkpoints; after
``rotate(signing=True)`` the old private key is kept (it may be removed by hand once
archived) and its public key stays for verification.

Every file is created with ``os.open(..., 0o600)`` (written to a temporary name,
fsync'd, then linked into place, never overwritten), the folder with ``mkdir(0o700)``;
nothing is chmod'ed afterwards. :meth:`Keyring.load` refuses, with a
:class:`KeyFileError` naming the file, any secret key file that group or others may
read or write, a public key file that group or others may write, a folder that group or
others may write, and symbolic links.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomnode.core.layout import fsync_dir as _fsync_dir
from dicomnode.errors import DicomNodeError

LOG = logging.getLogger(__name__)

DATA_KEY_BYTES = 32  # AES-256
_DATA_RE = re.compile(r"^data-k(\d+)\.json$")
_SIGN_RE = re.compile(r"^signing-s(\d+)\.pem$")
_PUB_RE = re.compile(r"^signing-s(\d+)\.pub\.pem$")
_SECRET_BITS = 0o077  # no access at all for group / others
_PUBLIC_BITS = 0o022  # public keys may be readable, never writable


class KeyringError(DicomNodeError):
    """The audit keyring cannot be used (no such key ID, not initialised, ...)."""


class KeyFileError(KeyringError):
    """A key file (or the key folder) is unsafe or unreadable; ``path`` names it."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class DataKey:
    """One AES-256-GCM data key; ``key`` is never shown in ``repr``."""

    key_id: str
    created: datetime
    key: bytes = field(repr=False)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 8 bytes of SHA-256 of its raw form, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def load_public_keys(path: Path | str) -> dict[str, Ed25519PublicKey]:
    """Public keys for ``verify``: every ``*.pub.pem`` in a folder, or one PEM file.

    Returns ``{key ID: key}``; the key ID is ``s1`` for ``signing-s1.pub.pem``, else the
    file's stem. Only public material is read, so an auditor's copy works alone.
    """
    path = Path(path)
    files = sorted(path.glob("*.pub.pem")) if path.is_dir() else [path]
    if not files:
        raise KeyFileError(path, "no public key (*.pub.pem) in this folder")
    keys: dict[str, Ed25519PublicKey] = {}
    for file in files:
        match = _PUB_RE.match(file.name)
        key_id = f"s{match.group(1)}" if match else file.name.removesuffix(".pem").removesuffix(".pub")
        keys[key_id] = _load_public(file, _read_file(file, _PUBLIC_BITS))
    return keys


class Keyring:
    """The keys in one folder. Build with :meth:`init` (new folder) or :meth:`load`."""

    def __init__(self, folder: Path, data_keys: dict[str, DataKey],
                 signing_keys: dict[str, Ed25519PrivateKey],
                 public_keys: dict[str, Ed25519PublicKey]) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._set(data_keys, signing_keys, public_keys)

    def _set(self, data_keys: dict[str, DataKey], signing_keys: dict[str, Ed25519PrivateKey],
             public_keys: dict[str, Ed25519PublicKey]) -> None:
        if not data_keys:
            raise KeyFileError(self.folder, "no data key (data-k*.json); run `dicomnode keys init`")
        if not signing_keys:
            raise KeyFileError(self.folder, "no signing key (signing-s*.pem); run `dicomnode keys init`")
        self._data = dict(data_keys)
        self._signing = dict(signing_keys)
        self._public = dict(public_keys)
        self._current = max(self._data, key=_number)
        self._current_signing = max(self._signing, key=_number)

    # -- creation ------------------------------------------------------------------

    @classmethod
    def init(cls, folder: Path | str) -> Keyring:
        """Create the folder (0700) with data key ``k1`` and signing key pair ``s1``.

        Refuses a folder that already holds keys (use :meth:`rotate`) or that group or
        others may write.
        """
        folder = Path(folder)
        _make_folder(folder)
        existing = [p.name for p in folder.iterdir()
                    if _DATA_RE.match(p.name) or _SIGN_RE.match(p.name) or _PUB_RE.match(p.name)]
        if existing:
            raise KeyFileError(folder, f"already holds keys ({', '.join(sorted(existing))}); "
                                       "use `dicomnode keys rotate`")
        _write_data_key(folder, "k1")
        _write_signing_key(folder, "s1")
        LOG.info("audit keys created in %s (data key k1, signing key s1)", folder)
        return cls.load(folder)

    @classmethod
    def load(cls, folder: Path | str) -> Keyring:
        """Read every key in ``folder``, refusing unsafe permissions (:class:`KeyFileError`)."""
        folder = Path(folder)
        return cls(folder, *_read_folder(folder))

    def reload(self) -> None:
        """Read the folder again (e.g. after ``dicomnode keys rotate`` in another process)."""
        with self._lock:
            self._set(*_read_folder(self.folder))

    def rotate(self, *, signing: bool = False) -> str:
        """Add a new data key, which becomes current; returns its key ID.

        Old data keys stay, so that records written under them stay readable. With
        ``signing=True`` a new signing key pair is added too; old public keys stay for
        verification.
        """
        with self._lock:
            data, signing_keys, public = _read_folder(self.folder)
            new_id = f"k{max(_number(k) for k in data) + 1}"
            _write_data_key(self.folder, new_id)
            if signing:
                _write_signing_key(self.folder, f"s{max(_number(k) for k in public) + 1}")
            self._set(*_read_folder(self.folder))
        LOG.info("audit data key rotated in %s: current key is now %s%s", self.folder, new_id,
                 f", signing key {self._current_signing}" if signing else "")
        return new_id

    # -- use -----------------------------------------------------------------------

    @property
    def current_key_id(self) -> str:
        """The data key ID that new records are encrypted under."""
        return self._current

    @property
    def key_ids(self) -> list[str]:
        """Every data key ID, oldest first."""
        return sorted(self._data, key=_number)

    def data_key(self, key_id: str) -> bytes:
        """The 32-byte AES key named ``key_id``."""
        try:
            return self._data[key_id].key
        except KeyError:
            raise KeyringError(f"no data key {key_id!r} in {self.folder} "
                               f"(have {', '.join(self.key_ids)})") from None

    def data_key_info(self, key_id: str) -> DataKey:
        """The data key named ``key_id`` with its creation time."""
        self.data_key(key_id)
        return self._data[key_id]

    @property
    def signing_key_id(self) -> str:
        """The ID (``s1``, ...) of the key that signs new checkpoints."""
        return self._current_signing

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        """The private key that signs new checkpoints."""
        return self._signing[self._current_signing]

    @property
    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public signing key, current and old, by key ID."""
        return dict(self._public)


# -- files -------------------------------------------------------------------------

def _number(key_id: str) -> int:
    return int(key_id[1:])


def _make_folder(folder: Path) -> None:
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
        return
    _check_folder(folder)


def _check_folder(folder: Path) -> None:
    try:
        st = os.stat(folder, follow_symlinks=False)
    except FileNotFoundError:
        raise KeyFileError(folder, "key folder does not exist; run `dicomnode keys init`") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(folder, "is not a folder (symbolic links are refused)")
    if st.st_mode & 0o022:
        raise KeyFileError(folder, f"key folder permissions {stat.filemode(st.st_mode)} let group "
                                   f"or others replace keys; run `chmod 700 {folder}`")


def _read_file(path: Path, forbidden_bits: int) -> bytes:
    """Read ``path`` through one descriptor, checking its mode on that descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(path, f"cannot open key file ({exc.strerror}; symbolic links "
                                 "are refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(path, "is not a regular file")
        if st.st_mode & forbidden_bits:
            what = "read or write" if forbidden_bits == _SECRET_BITS else "write"
            raise KeyFileError(path, f"permissions {stat.filemode(st.st_mode)} let group or others "
                                     f"{what} this key file; refusing it (`chmod 600 {path}`)")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 with ``data``, durably, never replacing an existing file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(path, "already exists; refusing to overwrite a key") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)




def _write_data_key(folder: Path, key_id: str) -> None:
    doc = {"key_id": key_id, "algorithm": "AES-256-GCM",
           "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
           "key": base64.b64encode(os.urandom(DATA_KEY_BYTES)).decode("ascii")}
    _write_file(folder / f"data-{key_id}.json", (json.dumps(doc, indent=1) + "\n").encode())


def _write_signing_key(folder: Path, key_id: str) -> None:
    private = Ed25519PrivateKey.generate()
    _write_file(folder / f"signing-{key_id}.pem", private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_file(folder / f"signing-{key_id}.pub.pem", private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _load_public(path: Path, data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(path, f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(path, "not an Ed25519 public key")
    return key


def _read_folder(folder: Path) -> tuple[dict[str, DataKey], dict[str, Ed25519PrivateKey],
                                        dict[str, Ed25519PublicKey]]:
    _check_folder(folder)
    data: dict[str, DataKey] = {}
    signing: dict[str, Ed25519PrivateKey] = {}
    public: dict[str, Ed25519PublicKey] = {}
    for path in sorted(folder.iterdir()):
        if m := _DATA_RE.match(path.name):
            key = _parse_data_key(path, _read_file(path, _SECRET_BITS))
            if key.key_id != f"k{m.group(1)}":
                raise KeyFileError(path, f"holds key ID {key.key_id!r}, not k{m.group(1)}")
            data[key.key_id] = key
        elif m := _SIGN_RE.match(path.name):
            try:
                private = serialization.load_pem_private_key(
                    _read_file(path, _SECRET_BITS), password=None)
            except (ValueError, TypeError) as exc:
                raise KeyFileError(path, f"not an unencrypted PEM private key ({exc})") from None
            if not isinstance(private, Ed25519PrivateKey):
                raise KeyFileError(path, "not an Ed25519 private key")
            signing[f"s{m.group(1)}"] = private
        elif m := _PUB_RE.match(path.name):
            public[f"s{m.group(1)}"] = _load_public(path, _read_file(path, _PUBLIC_BITS))
    for key_id, private in signing.items():
        pub_path = folder / f"signing-{key_id}.pub.pem"
        if key_id not in public:
            raise KeyFileError(pub_path, "missing: every signing key needs its public key file")
        if key_fingerprint(public[key_id]) != key_fingerprint(private.public_key()):
            raise KeyFileError(pub_path, f"does not match signing-{key_id}.pem")
    return data, signing, public


def _parse_data_key(path: Path, raw: bytes) -> DataKey:
    try:
        doc = json.loads(raw)
        key = base64.b64decode(doc["key"], validate=True)
        created = datetime.fromisoformat(doc["created"].replace("Z", "+00:00"))
        key_id = str(doc["key_id"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyFileError(path, f"not a data key file ({type(exc).__name__})") from None
    if doc.get("algorithm") != "AES-256-GCM" or len(key) != DATA_KEY_BYTES:
        raise KeyFileError(path, "not an AES-256-GCM key of 32 bytes")
    return DataKey(key_id, created, key)


def public_keys_of(keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]
                   ) -> dict[str, Ed25519PublicKey]:
    """``{fingerprint: key}`` for a mapping or an iterable of public keys."""
    values = keys.values() if isinstance(keys, Mapping) else keys
    out: dict[str, Ed25519PublicKey] = {}
    for key in values:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"public_keys: expected Ed25519PublicKey, not {type(key).__name__}")
        out[key_fingerprint(key)] = key
    return out
