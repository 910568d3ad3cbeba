"""The DIMSE front door: a pynetdicom C-ECHO / C-STORE SCP (PS3.4 Annex A and B).

Every storage SOP class and every transfer syntax the peer proposes is accepted
(the first proposed transfer syntax of each context, so that instances are stored
exactly as the sender encoded them). The data set reaches the disk as its P-DATA
fragments arrive (:mod:`dicomnode.ingest.streaming`), never whole in memory. The
C-STORE handler never decodes pixel data: it reads the few attributes it needs from the
start of that file, has the spool adopt it durably (fdatasync, rename), commits the
index row, and only then answers Success. Errors become a DIMSE status here and
nowhere else.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index
from dicomnode.core.status import Status
from dicomnode.core.tls import server_context
from dicomnode.ingest.admission import (
    IMPLEMENTATION_CLASS_UID,
    Admission,
    AdmissionSession,
    Arrival,
    Outcome,
    implementation_version_name,
)
from dicomnode.ingest.header import encode_file_meta
from dicomnode.ingest.pynetdicom_dimse import SinkFactory
from dicomnode.ingest.pynetdicom_ext import NodeAssociationServer
from dicomnode.ingest.spool import Spool
from dicomnode.ingest.streaming import DatasetStream, StreamedDataset

LOG = logging.getLogger(__name__)

IMPLEMENTATION_VERSION_NAME = implementation_version_name()
_NO_AE_LIMIT = 1 << 20


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
        self.admission = Admission(config, spool, index, audit=self.audit)
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
        # NodeACSE counts ingest.max_associations itself, over negotiated associations
        # only; pynetdicom's own count includes connections still silent
        ae.maximum_associations = _NO_AE_LIMIT
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
        if cfg.open_to_any_caller:
            LOG.warning("accept_any_caller: any calling AE title that reaches %s:%s may"
                        " store instances (list them in allowed_callers)", host, port)
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

        sink_factory: SinkFactory = self._dataset_sink

        class _Server(NodeAssociationServer):
            node_config = cfg
            adopted_socket = sock
            dataset_sink_factory = staticmethod(sink_factory)

        server = ae.make_server(address, evt_handlers=handlers, server_class=_Server,
                                ssl_context=context)
        assert isinstance(server, NodeAssociationServer)
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
        # closed, never removed: EVT_RELEASED may still come after this and needs the studies
        session: AdmissionSession | None = getattr(event.assoc, "dicomnode_session", None)
        if session is not None:
            session.close()

    def _handle_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _handle_released(self, event: evt.Event) -> None:
        # The studies live on the association object itself: no shared map to clean
        # up, and no race with EVT_CONN_CLOSE, which may fire before EVT_RELEASED.
        session: AdmissionSession | None = getattr(event.assoc, "dicomnode_session", None)
        studies = session.studies if session is not None else {}
        if studies and self.config.completion.on_association_release:
            try:
                self.index.record_release(event.assoc.requestor.ae_title, sorted(studies))
            except Exception:
                LOG.exception("cannot record the association release")
            if self._on_released is not None:
                self._on_released()

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        with self._in_flight_cv:
            self._in_flight += 1
        try:
            return self._store(event)
        except Exception:  # nothing escapes a handler
            LOG.exception("unexpected error while storing an instance")
            return int(Status.PROCESSING_FAILURE)
        finally:
            with self._in_flight_cv:
                self._in_flight -= 1
                self._in_flight_cv.notify_all()

    def _session(self, assoc: Association) -> AdmissionSession:
        """The association's admission session (its studies live on the association
        itself: no shared map to clean up, and no race between EVT_CONN_CLOSE and
        EVT_RELEASED, which may come in either order)."""
        session: AdmissionSession | None = getattr(assoc, "dicomnode_session", None)
        if session is None:
            rq = assoc.requestor
            session = self.admission.session(rq.ae_title.strip(), rq.address,
                                             assoc.acceptor.ae_title.strip())
            assoc.dicomnode_session = session  # type: ignore[attr-defined]
        return session

    def _dataset_sink(self, assoc: Association, context_id: int, command_set: Dataset
                      ) -> DatasetStream:
        """Where a C-STORE-RQ's data set is written as it arrives: a temp file in the
        spool, its File Meta Information (PS3.10 7.1) first, from the command set and the
        presentation context (see :mod:`dicomnode.ingest.streaming`)."""
        cx = assoc._accepted_cx.get(context_id)
        ts = str(cx.transfer_syntax[0]) if cx is not None and cx.transfer_syntax else ""
        meta = encode_file_meta(
            _uid_text(command_set.get("AffectedSOPClassUID")),
            _uid_text(command_set.get("AffectedSOPInstanceUID")), ts,
            IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
            assoc.requestor.ae_title.strip())
        return DatasetStream(self.spool, meta, limit=self.config.ingest.max_instance_bytes,
                             disk_guard=self.admission.disk_guard)

    def _store(self, event: evt.Event) -> int | Dataset:
        """C-STORE (PS3.4 B.2): admit the received data set; its status is the answer.

        The data set was written to a temp file in the spool as its P-DATA fragments
        arrived (:mod:`dicomnode.ingest.pynetdicom_dimse`); the admission adopts that
        file by rename, or it is removed here."""
        req = event.request
        assert isinstance(req, C_STORE)
        streamed: StreamedDataset | None = getattr(req, "dicomnode_streamed", None)
        calling = event.assoc.requestor.ae_title.strip()
        if streamed is None:  # Command Data Set Type 0x0101: no data set (PS3.7 E.1)
            LOG.warning("refused a C-STORE-RQ without a data set from %s", calling)
            return Status.CANNOT_UNDERSTAND
        try:
            if streamed.path is None:
                LOG.warning("refused an instance of %d bytes from %s: %s", streamed.size,
                            calling, streamed.refused)
                self._session(event.assoc).refused_unstored(
                    streamed.head, str(event.context.transfer_syntax), streamed.refused or "")
                return int(Status.OUT_OF_RESOURCES)
            with streamed.header() as head:
                outcome = self._session(event.assoc).admit(Arrival(
                    sop_class_uid=str(req.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                    transfer_syntax=str(event.context.transfer_syntax),
                    size=streamed.size, header_bytes=head, file=streamed.path,
                ))
            if outcome.stored and not outcome.duplicate:
                streamed.adopted()
            return _response(outcome)
        finally:
            streamed.discard()  # a no-op once the spool adopted the file


def _uid_text(value: object) -> str:
    """A command set UID as text for the file meta; the admission checks it later."""
    text = str(value or "").rstrip("\x00 ")
    return text.encode("ascii", errors="replace").decode("ascii")


def _response(outcome: Outcome) -> int | Dataset:
    """The C-STORE response status, with its Error Comment (0000,0902) when it has one."""
    if not outcome.comment:
        return int(outcome.status)
    rsp = Dataset()
    rsp.Status = int(outcome.status)
    rsp.ErrorComment = outcome.comment[:64]  # LO
    return rsp
