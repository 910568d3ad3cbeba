"""Forwarding audit messages to an audit record repository: IHE ATNA over syslog/TLS.

Each DICOM audit message (PS3.15 A.5.1, :func:`dicomnode.audit.codec.to_xml`) becomes
one RFC 5424 syslog message, as IHE ITI TF-2 "Record Audit Event" (ITI-20) asks::

    <PRI>1 TIMESTAMP HOSTNAME dicomnode PROCID IHE+RFC-3881 - BOM<?xml ...><AuditMessage>...

* PRI: facility 10 (security/authorization, "authpriv") * 8 + a severity taken from the
  EventOutcomeIndicator: 0 -> 5 notice, 4 -> 4 warning, 8 -> 3 error, 12 -> 2 critical
  (RFC 5424 6.2.1); so a success is ``<85>``.
* VERSION 1; TIMESTAMP in UTC with milliseconds (RFC 5424 6.2.3), taken when the
  message is queued; HOSTNAME, APP-NAME ``dicomnode``, PROCID (the process ID), MSGID
  ``IHE+RFC-3881``; no STRUCTURED-DATA (``-``); MSG is a UTF-8 BOM and the XML
  (RFC 5424 6.4).

Messages travel over TLS 1.2 or later (RFC 5425), the server authenticated against
``ca_file`` (and its name checked against ``host``), the node authenticated with
``certfile``/``keyfile`` when given (ATNA node authentication). Framing is octet
counting, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 4.3).

The queue is a SQLite database in ``queue_dir`` (owner-only permissions). A message is
complete when queued -- header and all -- so a restart sends exactly what was queued, in
the order queued. One background thread takes the oldest messages, sends them and
deletes them once written to the TLS connection; on any error it drops the connection
and retries after an exponential backoff (``backoff_initial`` doubling up to
``backoff_max``). Audit messages hold patient identifiers; pass ``queue_key`` (32 bytes)
to keep them AES-256-GCM encrypted while they wait on disk.

Delivery is at least once, and not more than that: syslog over TLS has no
acknowledgement, so a message written just before the repository drops the connection
may be lost in transit (RFC 5425 4.4 notes the same); the forwarder checks the
connection for an orderly close before each batch to keep that window small.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.audit.codec import to_xml
from dicomnode.audit.model import AuditEvent
from dicomnode.core.db import ThreadLocalSQLite

LOG = logging.getLogger(__name__)

DB_FILENAME = "atna-queue.sqlite3"
FACILITY_AUTHPRIV = 10
APP_NAME = "dicomnode"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"

SEVERITY_BY_OUTCOME = {0: 5, 4: 4, 8: 3, 12: 2}
"""RFC 5424 severity for each EventOutcomeIndicator (notice, warning, error, critical)."""

_AAD = b"dicomnode-atna-queue-v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queued_at TEXT NOT NULL,
    encrypted INTEGER NOT NULL,
    payload BLOB NOT NULL
)
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _header_field(value: str, limit: int, name: str) -> str:
    """An RFC 5424 header field: PRINTUSASCII (33-126), at most ``limit`` octets, or ``-``."""
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value)[:limit]
    if not cleaned:
        return "-"
    if cleaned != value:
        LOG.debug("syslog %s %r written as %r", name, value, cleaned)
    return cleaned


def format_timestamp(value: datetime) -> str:
    """RFC 5424 6.2.3 TIMESTAMP: UTC, millisecond precision, ``Z``."""
    if value.utcoffset() is None:
        raise ValueError(f"clock: must return timezone-aware datetimes, not {value!r}")
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def outcome_of(xml: str) -> int:
    """EventOutcomeIndicator of a DICOM audit message; ValueError if ``xml`` is not one."""
    try:
        root = ET.fromstring(xml.encode("utf-8"))
    except ET.ParseError as exc:
        raise ValueError(f"xml: not well-formed ({exc})") from None
    ident = root.find("EventIdentification")
    if root.tag != "AuditMessage" or ident is None:
        raise ValueError("xml: not a DICOM audit message (PS3.15 A.5.1 AuditMessage)")
    try:
        outcome = int(ident.get("EventOutcomeIndicator", ""))
    except ValueError:
        raise ValueError("xml: EventOutcomeIndicator missing or not a number") from None
    if outcome not in SEVERITY_BY_OUTCOME:
        raise ValueError(f"xml: EventOutcomeIndicator must be 0, 4, 8 or 12, not {outcome}")
    return outcome


def syslog_message(
    xml: str,
    *,
    timestamp: datetime,
    hostname: str,
    procid: str,
    outcome: int | None = None,
    app_name: str = APP_NAME,
) -> bytes:
    """One RFC 5424 message carrying ``xml`` (IHE ATNA); ``outcome`` is read from it if None."""
    if outcome is None:
        outcome = outcome_of(xml)
    if outcome not in SEVERITY_BY_OUTCOME:
        raise ValueError(f"outcome: must be 0, 4, 8 or 12, not {outcome!r}")
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY_BY_OUTCOME[outcome]
    header = " ".join(
        (
            f"<{pri}>1",
            format_timestamp(timestamp),
            _header_field(hostname, 255, "HOSTNAME"),
            _header_field(app_name, 48, "APP-NAME"),
            _header_field(procid, 128, "PROCID"),
            MSGID,
            "-",  # no STRUCTURED-DATA
        )
    )
    return header.encode("ascii") + b" " + BOM + xml.encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 5425 4.3 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class Forwarder:
    """Queue audit messages on disk and send them, in order, to a syslog/TLS repository.

    ``enqueue`` may be called from any thread, before ``start`` and after a restart;
    ``start`` runs the sender thread; ``stop`` ends it, leaving unsent messages queued.
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        host: str,
        port: int,
        ca_file: str | os.PathLike[str],
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], datetime] = _utcnow,
        hostname: str | None = None,
        app_name: str = APP_NAME,
        queue_key: bytes | None = None,
        connect_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        batch_size: int = 100,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host: must be a host name or address, not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port: must be 1-65535, not {port!r}")
        if keyfile is not None and certfile is None:
            raise ValueError("keyfile: given without certfile")
        for name, value in (("ca_file", ca_file), ("certfile", certfile), ("keyfile", keyfile)):
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name}: no such file: {value}")
        if queue_key is not None and (not isinstance(queue_key, bytes) or len(queue_key) != 32):
            raise ValueError("queue_key: must be 32 bytes (AES-256)")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout: must be > 0, not {connect_timeout!r}")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                f"backoff_initial: must be > 0 and <= backoff_max ({backoff_max}), "
                f"not {backoff_initial!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an int >= 1, not {batch_size!r}")

        self.host = host
        self.port = port
        self.hostname = hostname or socket.getfqdn() or socket.gethostname()
        self.app_name = app_name
        self.procid = str(os.getpid())
        self._clock = clock
        self._connect_timeout = float(connect_timeout)
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._batch_size = batch_size
        self._context = self._tls_context(ca_file, certfile, keyfile)
        self._aead: Any = None
        if queue_key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(queue_key)

        self.queue_dir = Path(queue_dir)
        self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.queue_dir / DB_FILENAME
        fresh = not path.exists()
        if fresh:
            path.touch(mode=0o600)
        os.chmod(path, 0o600)
        self._db = ThreadLocalSQLite(path, synchronous="NORMAL")
        self._db.executescript(_SCHEMA)
        if self._aead is None:
            (n,) = self._db.conn().execute(
                "SELECT COUNT(*) FROM messages WHERE encrypted = 1"
            ).fetchone()
            if n:
                raise ValueError(f"queue_key: the queue in {queue_dir} holds {n} encrypted messages")

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self.sent = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public

    def enqueue(self, xml: str) -> None:
        """Queue one DICOM audit message (its severity read from EventOutcomeIndicator)."""
        message = syslog_message(
            xml,
            timestamp=self._clock(),
            hostname=self.hostname,
            procid=self.procid,
            app_name=self.app_name,
        )
        encrypted = 0
        if self._aead is not None:
            nonce = os.urandom(12)
            message = nonce + self._aead.encrypt(nonce, message, _AAD)
            encrypted = 1
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO messages (queued_at, encrypted, payload) VALUES (?, ?, ?)",
                (self._clock().isoformat(), encrypted, message),
            )
        self._wake.set()

    def enqueue_event(self, event: AuditEvent) -> None:
        """Queue an :class:`~dicomnode.audit.model.AuditEvent` (as its PS3.15 XML)."""
        self.enqueue(to_xml(event))

    def pending(self) -> int:
        """How many messages are queued and not yet sent."""
        (n,) = self._db.conn().execute("SELECT COUNT(*) FROM messages").fetchone()
        return int(n)

    def start(self) -> None:
        """Start the sender thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"atna-forwarder-{self.host}:{self.port}", daemon=True
        )
        self._thread.start()
        LOG.info("forwarding audit messages to %s:%d (%d queued)", self.host, self.port,
                 self.pending())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the sender thread and close the connection; queued messages stay on disk."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                LOG.warning("audit forwarder did not stop within %.1f s", timeout)
        self._disconnect()

    def close(self) -> None:
        """Stop, then close the queue database."""
        self.stop()
        self._db.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # ------------------------------------------------------------------ sender

    @staticmethod
    def _tls_context(
        ca_file: str | os.PathLike[str],
        certfile: str | os.PathLike[str] | None,
        keyfile: str | os.PathLike[str] | None,
    ) -> ssl.SSLContext:
        """TLS 1.2+ client context: the server checked against ``ca_file`` and its name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=os.fspath(ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ca_file: cannot load {ca_file}: {exc}") from None
        if certfile is not None:
            try:
                context.load_cert_chain(
                    os.fspath(certfile), None if keyfile is None else os.fspath(keyfile)
                )
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"certfile: cannot load {certfile}: {exc}") from None
        return context

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
        try:
            sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        LOG.info("connected to audit repository %s:%d (%s)", self.host, self.port, sock.version())
        return sock

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _still_open(self, sock: ssl.SSLSocket) -> bool:
        """False when the repository has closed the connection (a repository sends nothing)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return sock.recv(1024) != b""  # EOF -> closed; stray data is ignored
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return True  # a TLS 1.3 session ticket, no application data
        except OSError:
            return False
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass

    def _batch(self) -> list[tuple[int, int, bytes]]:
        rows = self._db.conn().execute(
            "SELECT seq, encrypted, payload FROM messages ORDER BY seq LIMIT ?",
            (self._batch_size,),
        ).fetchall()
        return [(int(s), int(e), bytes(p)) for s, e, p in rows]

    def _plain(self, encrypted: int, payload: bytes) -> bytes:
        if not encrypted:
            return payload
        return bytes(self._aead.decrypt(payload[:12], payload[12:], _AAD))

    def _send_batch(self, rows: list[tuple[int, int, bytes]]) -> None:
        if self._sock is not None and not self._still_open(self._sock):
            LOG.info("audit repository %s:%d closed the connection", self.host, self.port)
            self._disconnect()
        if self._sock is None:
            self._sock = self._connect()
        last = None
        try:
            for seq, encrypted, payload in rows:
                if self._stop.is_set():
                    break
                self._sock.sendall(frame(self._plain(encrypted, payload)))
                last = seq
        finally:
            if last is not None:
                with self._db.transaction() as conn:
                    conn.execute("DELETE FROM messages WHERE seq <= ?", (last,))
                self.sent += sum(1 for seq, _, _ in rows if seq <= last)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                rows = self._batch()
            except Exception:
                LOG.exception("cannot read the audit forwarding queue")
                self._stop.wait(self._backoff_max)
                continue
            if not rows:
                self._wake.wait()
                continue
            try:
                self._send_batch(rows)
                failures = 0
                self.last_error = None
            except (OSError, ssl.SSLError) as exc:  # refused, reset, TLS failure, timeout
                self._disconnect()
                failures += 1
                delay = min(self._backoff_max, self._backoff_initial * 2 ** min(failures - 1, 30))
                self.last_error = f"{type(exc).__name__}: {exc}"
                log = LOG.warning if failures == 1 or failures % 10 == 0 else LOG.debug
                log(
                    "audit repository %s:%d unreachable (%s); %d queued, retry in %.1f s",
                    self.host, self.port, self.last_error, self.pending(), delay,
                )
                self._stop.wait(delay)
            except Exception:
                # A message that cannot be decrypted or a database error: keep it queued,
                # say so loudly, try again later rather than spin.
                self._disconnect()
                LOG.exception("audit forwarding failed")
                self._stop.wait(self._backoff_max)


__all__ = [
    "BOM",
    "FACILITY_AUTHPRIV",
    "Forwarder",
    "MSGID",
    "SEVERITY_BY_OUTCOME",
    "format_timestamp",
    "frame",
    "outcome_of",
    "syslog_message",
]
