"""The DIMSE front door: a pynetdicom C-ECHO / C-STORE SCP (PS3.4 Annex A and B).

Every storage SOP class and every transfer syntax the peer proposes is accepted
(the first proposed transfer syntax of each context, so that instances are stored
exactly as the sender encoded them). The C-STORE handler never decodes pixel
data: it reads the few attributes it needs from the header, writes the received
bytes durably through the spool, commits the index row, and only then answers
Success. Errors become a DIMSE status here and nowhere else.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import __version__
from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import NodeConfig
from dicomnode.errors import InvalidInstanceError, InvalidUIDError, StorageError
from dicomnode.index import Index, InstanceRecord
from dicomnode.ingest.diskguard import DiskGuard
from dicomnode.ingest.header import encode_file_meta, read_header
from dicomnode.ingest.reactor import FastRequestHandler
from dicomnode.ingest.spool import Spool, validate_uid
from dicomnode.ingest.tls import server_context

LOG = logging.getLogger(__name__)

# Implementation Class UID: a UUID-derived UID (PS3.5 B.2), fixed for this product.
IMPLEMENTATION_CLASS_UID = "2.25.160285946466287385733542389713476361517"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

# DIMSE statuses (PS3.4 B.2.3, PS3.7 C)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_PROCESSING_FAILURE = 0x0110

@dataclass
class _StudyTally:
    """What one association brought of one study (for its audit event)."""

    patient_id: str
    patient_name: str
    sop_classes: Counter[str] = field(default_factory=Counter)
    failed: int = 0


class NodeACSE(ACSE):
    """ACSE that also enforces the config's allowlist of callers (AE title + host)
    and the per-caller association limit.

    pynetdicom's own check knows only AE titles; ours adds the source address. A
    refused peer gets A-ASSOCIATE-RJ, permanent, service-user, "calling AE title not
    recognized" (PS3.8 9.3.4). A caller already holding
    ``ingest.max_associations_per_caller`` associations gets A-ASSOCIATE-RJ,
    transient, service-provider (presentation), "local limit exceeded" (2, 3, 2) —
    the same answer pynetdicom gives when ``max_associations`` is reached.
    """

    def _reject(self, result: int, source: int, diagnostic: int, reason: str) -> None:
        self.assoc.dicomnode_reject_reason = reason  # type: ignore[attr-defined]
        self.send_reject(result, source, diagnostic)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _open_from(self, calling: str) -> int:
        """Other acceptor associations (on any of the AE's servers) from ``calling``."""
        n = 0
        for other in self.assoc.ae.active_associations:
            if other is self.assoc or not other.is_acceptor:
                continue
            if other.is_released or other.is_aborted or other.is_rejected:
                continue
            if other.requestor.ae_title.strip() == calling:
                n += 1
        return n

    def _negotiate_as_acceptor(self) -> None:
        policy: NodeConfig | None = getattr(self.assoc, "node_config", None)
        calling = self.requestor.primitive.calling_ae_title.strip()  # type: ignore[union-attr]
        address = self.assoc.requestor.address
        if policy is not None and policy.allowed_callers:
            if not policy.caller_allowed(calling, address):
                LOG.warning(
                    "rejecting association from %s at %s: calling AE title not allowed",
                    calling,
                    address,
                )
                self._reject(0x01, 0x01, 0x03, "calling AE title or address not allowed")
                return
        limit = policy.ingest.max_associations_per_caller if policy is not None else None
        if limit is not None and self._open_from(calling) >= limit:
            LOG.warning(
                "rejecting association from %s at %s: it already holds %d (the limit)",
                calling,
                address,
                limit,
            )
            self._reject(0x02, 0x03, 0x02, "too many associations from this calling AE title")
            return
        super()._negotiate_as_acceptor()


class NodeRequestHandler(FastRequestHandler):
    """Creates event-driven associations that carry the node's policy and use NodeACSE."""

    def handle(self) -> None:
        """Finish the TLS handshake (if any) in this connection's own thread, then run
        the association. A peer that fails the handshake (plain DICOM on a TLS port, no
        or an untrusted client certificate) or stalls in it longer than the ACSE timeout
        is logged and disconnected; the server goes on."""
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(self.server.ae.acse_timeout)  # type: ignore[attr-defined]
                sock.do_handshake()
                sock.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSError
                LOG.warning("TLS handshake with %s failed: %s", self.client_address, exc)
                try:
                    sock.close()
                except OSError:
                    pass
                return
            LOG.debug("TLS %s with %s (%s)", sock.version(), self.client_address, sock.cipher())
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.node_config = self.server.node_config  # type: ignore[attr-defined]
        assoc.acse = NodeACSE(assoc)
        sock = assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """A threaded association server that can adopt an already listening socket.

    Several receiving processes can then share one port: the parent creates and
    binds the socket, each child adopts it.
    """

    node_config: NodeConfig
    adopted_socket: socket.socket | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.adopted_socket is not None:
            self.socket.close()
            self.socket = self.adopted_socket
            self.server_address = self.socket.getsockname()
            return
        super().server_bind()

    def server_activate(self) -> None:
        if self.adopted_socket is not None:
            return  # already listening
        super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; with TLS, wrap without handshaking here (pynetdicom would handshake
        in the accepting thread, where one silent client stalls every other caller):
        :meth:`NodeRequestHandler.handle` does it in the connection's thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            try:
                client = self.ssl_context.wrap_socket(
                    client, server_side=True, do_handshake_on_connect=False
                )
            except OSError:
                client.close()
                raise
        return client, address


class StoreSCP:
    """The C-ECHO/C-STORE service provider of the node."""

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        index: Index,
        on_released: Callable[[], None] | None = None,
        audit: Audit | None = None,
        metrics: Any = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.index = index
        self._on_released = on_released
        self.audit: Audit = audit or NullAudit()
        self.metrics = metrics  # dicomnode.metrics.Metrics, in the process serving /metrics
        rc = config.retention
        self.disk_guard = DiskGuard(config.storage, int(rc.min_free_gb * 1e9), rc.min_free_ratio)
        self._server: NodeAssociationServer | None = None
        self._servers: list[NodeAssociationServer] = []
        #: (host, port) of the separate TLS server, when ``ingest.tls.port`` is set
        self.tls_address: tuple[str, int] | None = None
        self._in_flight = 0
        self._in_flight_cv = threading.Condition()

    # -- lifecycle ------------------------------------------------------------

    def _make_ae(self) -> AE:
        # Accept any storage SOP class, including private and future ones, and keep
        # pynetdicom's per-PDU logging out of the hot path (process-wide settings).
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        _config.LOG_HANDLER_LEVEL = "none"
        ic = self.config.ingest
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = ic.max_pdu_size
        ae.acse_timeout = ic.acse_timeout
        ae.dimse_timeout = ic.dimse_timeout
        ae.network_timeout = ic.network_timeout
        ae.maximum_associations = ic.max_associations
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        return ae

    def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Start serving in background threads; returns the bound (host, port).

        With ``sock`` (an already bound and listening socket) the server adopts it.
        """
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
        ]

        cfg = self.config
        tls = cfg.ingest.tls
        context = server_context(tls) if tls is not None else None

        # without a separate TLS port the main port is TLS-only; with one, it stays plain
        main = self._serve(ae, handlers, (cfg.bind_address, cfg.port), sock,
                           context if tls is not None and tls.port is None else None)
        self._server = main
        if tls is not None and tls.port is not None:
            tls_server = self._serve(ae, handlers, (cfg.bind_address, tls.port), None, context)
            tls_host, tls_port = tls_server.server_address[:2]
            self.tls_address = (str(tls_host), int(tls_port))
        host, port = main.server_address[:2]
        return str(host), int(port)

    def _serve(
        self,
        ae: AE,
        handlers: list[Any],
        address: tuple[str, int],
        sock: socket.socket | None,
        context: ssl.SSLContext | None,
    ) -> NodeAssociationServer:
        """Start one association server (accepting in a daemon thread)."""
        cfg = self.config

        class _Server(NodeAssociationServer):
            node_config = cfg
            adopted_socket = sock

        server = ae.make_server(address, evt_handlers=handlers, server_class=_Server,
                                ssl_context=context)
        # one AE, several servers: ae.active_associations (max_associations and the
        # per-caller limit) counts the associations of all of them
        ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dimse-accept",
            daemon=True,
        )
        thread.start()
        self._servers.append(server)
        host, port = server.server_address[:2]
        LOG.info("DIMSE SCP %s listening on %s:%s%s", cfg.ae_title, host, port,
                 " (TLS)" if context is not None else "")
        return server

    def _active(self) -> list[Association]:
        return [a for server in self._servers for a in server.active_associations]

    @property
    def active_associations(self) -> int:
        return len(self._active())

    def stop_accepting(self) -> None:
        """Stop listening; associations already open go on."""
        for server in self._servers:
            server.shutdown()  # stops serve_forever and closes the listening socket

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no association is open (or ``timeout``); True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._active():
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: no new associations, finish stores in flight, then abort the rest."""
        if not self._servers:
            return
        self.stop_accepting()
        if not self.wait_idle(timeout):
            LOG.warning("associations still open after %.0f s; aborting them", timeout)
            with self._in_flight_cv:
                self._in_flight_cv.wait_for(lambda: self._in_flight == 0, timeout=10)
            for assoc in self._active():
                assoc.abort()
        self._server = None
        self._servers = []

    # -- event handlers -----------------------------------------------------

    def _audit_association(self, event: evt.Event, accepted: bool) -> None:
        if self.metrics is not None:
            self.metrics.association(accepted, None if accepted else "rejected at association")
        from dicomnode.audit import events

        rq = event.assoc.requestor
        self.audit.record(events.association,
            accepted, rq.ae_title.strip(), self.config.ae_title, rq.address,
            reason=None if accepted else getattr(
                event.assoc, "dicomnode_reject_reason",
                "calling AE title, address or called AE not allowed",
            ),
        )

    def _handle_accepted(self, event: evt.Event) -> None:
        LOG.info(
            "association accepted from %s at %s",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )
        self._audit_association(event, True)

    def _handle_rejected(self, event: evt.Event) -> None:
        LOG.info(
            "association rejected: calling %s at %s",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )
        self._audit_association(event, False)

    def _handle_closed(self, event: evt.Event) -> None:
        """One 'DICOM Instances Transferred' audit event per study the connection brought."""
        from dicomnode.audit import events

        # read, never cleared: EVT_RELEASED may still come after this and needs the studies
        tallies: dict[str, _StudyTally] = getattr(event.assoc, "dicomnode_studies", {})
        rq = event.assoc.requestor
        for study_uid, t in tallies.items():
            self.audit.record(events.instances_received,
                rq.ae_title.strip(), rq.address, self.config.ae_title, study_uid,
                dict(t.sop_classes), t.patient_id, t.patient_name,
                outcome=0 if not t.failed else 4,
            )

    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_released(self, event: evt.Event) -> None:
        # The studies live on the association object itself: no shared map to clean
        # up, and no race with EVT_CONN_CLOSE, which may fire before EVT_RELEASED.
        studies: dict[str, _StudyTally] = getattr(event.assoc, "dicomnode_studies", {})
        if studies and self.config.completion.on_association_release:
            try:
                self.index.record_release(event.assoc.requestor.ae_title, sorted(studies))
            except Exception:
                LOG.exception("cannot record the association release")
            if self._on_released is not None:
                self._on_released()

    def _handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        with self._in_flight_cv:
            self._in_flight += 1
        try:
            return self._store(event)
        except Exception:  # nothing escapes a handler
            LOG.exception("unexpected error while storing an instance")
            return STATUS_PROCESSING_FAILURE
        finally:
            with self._in_flight_cv:
                self._in_flight -= 1
                self._in_flight_cv.notify_all()

    def _store(self, event: evt.Event) -> int:
        req = event.request
        assoc = event.assoc
        calling_ae = assoc.requestor.ae_title.strip()
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_uid_cmd = str(req.AffectedSOPInstanceUID or "")
        transfer_syntax = event.context.transfer_syntax

        # The size limit comes first, before anything parses the dataset. pynetdicom
        # has already buffered every P-DATA fragment of it in memory by now (the DIMSE
        # layer hands a message to the handler only once it is complete), so this
        # bounds what is written and indexed, not what is received; max_pdu_size and
        # the network timeout bound the transfer itself.
        limit = self.config.ingest.max_instance_bytes
        if limit is not None:
            size = req.DataSet.getbuffer().nbytes if req.DataSet is not None else 0
            if size > limit:
                LOG.warning("refused an instance of %d bytes from %s: larger than the"
                            " limit of %d", size, calling_ae, limit)
                return STATUS_OUT_OF_RESOURCES

        allowed = self.config.caller_sop_classes(calling_ae)
        if allowed is not None and sop_class not in allowed:
            LOG.warning("refused SOP class %s from %s: not allowed", sop_class, calling_ae)
            return STATUS_NOT_AUTHORIZED

        data = req.DataSet.getbuffer()  # the received bytes, not copied
        try:
            validate_uid(sop_class, "Affected SOP Class UID")
            sop_uid = validate_uid(sop_uid_cmd, "Affected SOP Instance UID")
            header = read_header(data, transfer_syntax)
            if header.sop_instance_uid is not None and header.sop_instance_uid != sop_uid:
                raise InvalidInstanceError(
                    "SOP Instance UID in the dataset differs from the command's"
                )
            target = self.spool.instance_path(header.study_uid, header.series_uid, sop_uid)
        except (InvalidInstanceError, InvalidUIDError) as exc:
            LOG.warning("refused an instance from %s: %s", calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND

        studies = getattr(assoc, "dicomnode_studies", None)
        if studies is None:
            studies = assoc.dicomnode_studies = {}
        tally = studies.get(header.study_uid)  # only this association's thread touches it
        if tally is None:
            tally = studies[header.study_uid] = _StudyTally(header.patient_id, header.patient_name)

        ok, why = self.disk_guard.check()
        if not ok:  # refuse cleanly before the disk fills, rather than fail mid-write
            LOG.error("refused an instance from %s: %s", calling_ae, why)
            tally.failed += 1
            return STATUS_OUT_OF_RESOURCES

        if self.index.has_instance(sop_uid):
            LOG.debug("duplicate SOP instance %s: already stored", sop_uid)
            return STATUS_SUCCESS

        try:
            meta = encode_file_meta(
                sop_class, sop_uid, str(transfer_syntax), IMPLEMENTATION_CLASS_UID,
                IMPLEMENTATION_VERSION_NAME, calling_ae,
            )
            size = self.spool.store(target, (meta, data))
            self.index.add_instance(
                InstanceRecord(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                    transfer_syntax=str(transfer_syntax),
                    calling_ae=calling_ae,
                    size=size,
                    received_at=time.time(),
                    path=str(target.relative_to(self.spool.root)),
                    expected_count=header.expected_count,
                    called_ae=assoc.acceptor.ae_title.strip(),
                )
            )
        except StorageError as exc:
            LOG.error("cannot store an instance from %s: %s", calling_ae, exc)
            tally.failed += 1
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:
            # the index commit failed: the file may exist, but nothing was acknowledged
            LOG.error("cannot index an instance from %s: %s", calling_ae, exc)
            tally.failed += 1
            return STATUS_OUT_OF_RESOURCES
        tally.sop_classes[sop_class] += 1
        return STATUS_SUCCESS
