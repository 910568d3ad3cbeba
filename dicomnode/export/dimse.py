"""C-ECHO and C-STORE as a service user (PS3.4 Annex A, B).

The sender proposes only the SOP classes and transfer syntaxes present in what it
sends, streams each file from disk without decoding it, and sets TCP_NODELAY on
its socket (pynetdicom does not; without it small final PDUs wait for the peer's
delayed ACK and throughput against 16 KB-PDU peers drops several-fold).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import DestinationTls
from dicomnode.errors import DestinationError
from dicomnode.export.base import (
    DeliveryOutcome,
    Result,
    Sender,
    StatusClassifier,
    classify_status,
    describe_status,
)

LOG = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255

_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@HOST:PORT`` (IPv6 hosts in brackets)."""
        m = _DEST_RE.match(text.strip())
        if not m:
            raise DestinationError(f"{text!r} is not of the form AET@HOST:PORT")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise DestinationError(f"port {port} is out of range 1-65535")
        return cls(m["aet"].strip(), m["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def iter_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every file under the given files and folders, in sorted order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(x for x in p.rglob("*") if x.is_file())
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(str(p))


def scan(paths: Iterable[Path]) -> tuple[list[DicomFile], list[tuple[Path, str]]]:
    """Read each file's File Meta Information (only that); split into DICOM and not."""
    files: list[DicomFile] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            files.append(
                DicomFile(
                    path,
                    str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID),
                )
            )
        except Exception as exc:
            skipped.append((path, f"not a DICOM Part 10 file: {exc}"))
    return files, skipped


def _set_nodelay(assoc: Association) -> None:
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class DimseSender:
    """Sends to one peer as ``calling_ae``; over DICOM TLS (PS3.15 B.1) with ``tls``."""

    def __init__(
        self,
        peer: Peer,
        calling_ae: str = "DICOMNODE",
        *,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        network_timeout: float = 60,
        tls: DestinationTls | None = None,
    ) -> None:
        self.peer = peer
        self.calling_ae = calling_ae
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.tls = tls
        self._tls_context: ssl.SSLContext | None = None
        if tls is not None:
            from dicomnode.core.tls import client_context

            self._tls_context = client_context(tls)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = 0
        return ae

    def _associate(self, ae: AE) -> Association:
        tls_args = None
        if self._tls_context is not None:
            assert self.tls is not None
            tls_args = (self._tls_context, self.tls.server_hostname or self.peer.host)
        try:
            assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title,
                                 tls_args=tls_args)
        except (OSError, ValueError) as exc:  # pynetdicom lets some TLS errors through
            raise DestinationError(f"cannot associate with {self.peer}: {exc}") from exc
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DestinationError(f"{self.peer} rejected the association")
            raise DestinationError(f"cannot associate with {self.peer}")
        _set_nodelay(assoc)
        return assoc

    def echo(self) -> int:
        """C-ECHO; returns the status (0x0000 on success)."""
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            status = assoc.send_c_echo()
            if not status:
                raise DestinationError(f"no C-ECHO response from {self.peer}")
            return int(status.Status)
        finally:
            assoc.release()

    def send(
        self, files: list[DicomFile], progress: Callable[[DicomFile, int], None] | None = None
    ) -> SendReport:
        """C-STORE every file; one association per batch of at most 128 contexts."""
        report = SendReport()
        with _chunked_sending():  # stream from disk, never decode
            for batch in _batches(files):
                self._send_batch(batch, report, progress)
        return report

    def _send_batch(
        self,
        batch: list[DicomFile],
        report: SendReport,
        progress: Callable[[DicomFile, int], None] | None,
    ) -> None:
        ae = self._ae()
        contexts = sorted({(f.sop_class_uid, f.transfer_syntax) for f in batch})
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, ts)
        assoc = self._associate(ae)
        try:
            for f in batch:
                if not assoc.is_established:
                    report.failed.append((f.path, "association lost"))
                    continue
                try:
                    status = assoc.send_c_store(f.path)
                except Exception as exc:
                    report.failed.append((f.path, str(exc)))
                    continue
                code = int(status.Status) if status and "Status" in status else -1
                if code == -1:
                    report.failed.append((f.path, "no response (timeout or abort)"))
                elif code == 0 or (code & 0xF000) == 0xB000:
                    report.sent += 1
                else:
                    report.failed.append((f.path, f"status 0x{code:04X}"))
                if progress is not None:
                    progress(f, code)
        finally:
            if assoc.is_established:
                assoc.release()


    def send_files(self, files: list[DicomFile]) -> list[StoreStatus]:
        """C-STORE every file and return one :class:`StoreStatus` per file, in order.

        Each association proposes only the (SOP class, transfer syntax) pairs of its
        batch; an uncompressed explicit-VR file also offers Implicit VR Little Endian
        as a fallback in the same context, and is converted only when the peer picks
        that. Nothing raises for a peer or file problem: it is in the statuses.
        """
        out: list[StoreStatus] = []
        with _chunked_sending():
            for batch in _batches(files):
                out.extend(self._store_batch(batch))
        return out

    def _store_batch(self, batch: list[DicomFile]) -> list[StoreStatus]:
        ae = self._ae()
        for sop_class, ts in sorted({(f.sop_class_uid, f.transfer_syntax) for f in batch}):
            ae.add_requested_context(sop_class, _proposed_syntaxes(ts))
        try:
            assoc = self._associate(ae)
        except Exception as exc:  # DestinationError, OSError, pynetdicom's own
            reason = str(exc) if isinstance(exc, DestinationError) else f"{self.peer}: {exc}"
            LOG.warning("C-STORE to %s: %s", self.peer, reason)
            return [StoreStatus(f, None, reason, "unreachable") for f in batch]
        out: list[StoreStatus] = []
        try:
            accepted: dict[str, set[str]] = {}
            for cx in assoc.accepted_contexts:
                accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
            for f in batch:
                out.append(self._store_one(assoc, f, accepted.get(f.sop_class_uid, set())))
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def _store_one(self, assoc: Association, f: DicomFile, syntaxes: set[str]) -> StoreStatus:
        if not assoc.is_established:
            return StoreStatus(f, None, "association lost before this instance was sent", "lost")
        convert = (
            f.transfer_syntax not in syntaxes
            and f.transfer_syntax in _UNCOMPRESSED_EXPLICIT
            and str(ImplicitVRLittleEndian) in syntaxes
        )
        if f.transfer_syntax not in syntaxes and not convert:
            return StoreStatus(
                f,
                None,
                f"{self.peer} accepts no presentation context for SOP class"
                f" {f.sop_class_uid} in transfer syntax {f.transfer_syntax}",
                "refused",
            )
        try:
            if convert:  # the peer chose the implicit VR fallback: decode and convert
                status = assoc.send_c_store(dcmread(f.path))
            else:
                status = assoc.send_c_store(f.path)  # streamed from disk as it is
        except Exception as exc:
            if assoc.is_established:
                return StoreStatus(f, None, f"cannot send {f.path.name}: {exc}", "file")
            return StoreStatus(f, None, f"association lost: {exc}", "lost")
        if status and "Status" in status:
            return StoreStatus(f, int(status.Status), None, "status")
        return StoreStatus(f, None, "no response (timeout or abort)", "lost")


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The C-STORE of one file: the peer's ``status``, or why there is none.

    ``kind``: ``status`` (the peer answered), ``unreachable`` (no association),
    ``lost`` (the association timed out or was aborted), ``refused`` (the peer accepts
    no presentation context for this SOP class / transfer syntax), ``file`` (the file
    could not be sent while the association was fine).
    """

    file: DicomFile
    status: int | None
    error: str | None
    kind: Literal["status", "unreachable", "lost", "refused", "file"]


_UNCOMPRESSED_EXPLICIT = frozenset({str(ExplicitVRLittleEndian), str(ExplicitVRBigEndian)})


def _proposed_syntaxes(ts: str) -> list[str]:
    """The transfer syntaxes offered for a file in ``ts``: its own first, then Implicit
    VR Little Endian (which every SCP supports, PS3.5 10.1) where it converts losslessly."""
    if ts in _UNCOMPRESSED_EXPLICIT:
        return [ts, str(ImplicitVRLittleEndian)]
    return [ts]


_chunk_lock = threading.Lock()
_chunk_users = 0
_chunk_saved = False


@contextmanager
def _chunked_sending() -> Iterator[None]:
    """Turn on pynetdicom's STORE_SEND_CHUNKED_DATASET (a process-wide switch) while at
    least one sender in this process needs it, and restore it after the last one."""
    global _chunk_users, _chunk_saved
    with _chunk_lock:
        if _chunk_users == 0:
            _chunk_saved = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunk_users += 1
    try:
        yield
    finally:
        with _chunk_lock:
            _chunk_users -= 1
            if _chunk_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunk_saved


class DimseStoreSender(Sender):
    """The outbox's :class:`~dicomnode.export.base.Sender` for a DICOM peer: C-STORE SCU
    (PS3.4 Annex B) through :class:`DimseSender`, one association per :meth:`send`.

    Status mapping (``classify``, by default
    :func:`~dicomnode.export.base.classify_status`): Success and Warning are ok,
    0xA7xx (out of resources) transient, 0xA9xx / 0xCxxx permanent. No association,
    a timeout or an abort: transient. A SOP class or transfer syntax the peer refuses,
    or a file that is not DICOM: permanent. ``timeout`` sets the ACSE, DIMSE and
    network timeouts unless they are given one by one.
    """

    def __init__(
        self,
        peer: Peer,
        calling_ae: str = "DICOMNODE",
        *,
        timeout: float = 30.0,
        acse_timeout: float | None = None,
        dimse_timeout: float | None = None,
        network_timeout: float | None = None,
        classify: StatusClassifier = classify_status,
        tls: DestinationTls | None = None,
    ) -> None:
        if not isinstance(peer, Peer):
            raise TypeError(f"peer: must be a Peer, not {type(peer).__name__}")
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, not {timeout!r}")
        self.peer = peer
        self.classify = classify
        self.label = f"dimse {peer}"
        self._sender = DimseSender(
            peer,
            calling_ae,
            acse_timeout=acse_timeout or timeout,
            dimse_timeout=dimse_timeout or timeout,
            network_timeout=network_timeout or timeout,
            tls=tls,
        )

    def send(self, files: list[Path]) -> list[DeliveryOutcome]:
        outcomes: list[DeliveryOutcome | None] = []
        dicom: list[DicomFile] = []
        for path in files:
            found, skipped = scan([Path(path)])
            if skipped:
                outcomes.append(DeliveryOutcome.permanent(Path(path), skipped[0][1]))
            else:
                outcomes.append(None)
                dicom.extend(found)
        statuses = iter(self._sender.send_files(dicom) if dicom else [])
        return [o if o is not None else self._outcome(next(statuses)) for o in outcomes]

    def _outcome(self, st: StoreStatus) -> DeliveryOutcome:
        path = st.file.path
        if st.status is not None:
            result = self.classify(st.status)
            if result is Result.OK:
                reason = None if st.status == 0 else describe_status(st.status)
                return DeliveryOutcome(path, Result.OK, reason, st.status)
            return DeliveryOutcome(path, result, describe_status(st.status), st.status)
        reason = st.error or st.kind
        if st.kind in ("refused", "file"):
            return DeliveryOutcome.permanent(path, reason)
        return DeliveryOutcome.transient(path, reason)


def _batches(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Split files into groups that need at most MAX_CONTEXTS presentation contexts."""
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        key = (f.sop_class_uid, f.transfer_syntax)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(f)
    if batch:
        yield batch
