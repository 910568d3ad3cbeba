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
from dicomnode.ingest.pynetdicom_ext import NodeAssociationServer
from dicomnode.ingest.spool import Spool

LOG = logging.getLogger(__name__)

IMPLEMENTATION_VERSION_NAME = implementation_version_name()


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

    def _store(self, event: evt.Event) -> int | Dataset:
        """C-STORE (PS3.4 B.2): admit the received data set; its status is the answer.

        pynetdicom has already buffered every P-DATA fragment of the data set in memory
        when it calls the handler (the DIMSE layer hands over complete messages only);
        the data set is written from that buffer without a copy."""
        req = event.request
        assert isinstance(req, C_STORE)
        data = req.DataSet.getbuffer() if req.DataSet is not None else memoryview(b"")
        outcome = self._session(event.assoc).admit(Arrival(
            sop_class_uid=str(req.AffectedSOPClassUID or ""),
            sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax=str(event.context.transfer_syntax),
            size=data.nbytes, header_bytes=data, dataset=data,
        ))
        return _response(outcome)


def _response(outcome: Outcome) -> int | Dataset:
    """The C-STORE response status, with its Error Comment (0000,0902) when it has one."""
    if not outcome.comment:
        return int(outcome.status)
    rsp = Dataset()
    rsp.Status = int(outcome.status)
    rsp.ErrorComment = outcome.comment[:64]  # LO
    return rsp
