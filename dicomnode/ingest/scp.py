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
    """ACSE that also enforces the config's allowlist of callers (AE title + host).

    pynetdicom's own check knows only AE titles; ours adds the source address. A
    refused peer gets A-ASSOCIATE-RJ, permanent, service-user, "calling AE title not
    recognized" (PS3.8 9.3.4).
    """

    def _negotiate_as_acceptor(self) -> None:
        policy: NodeConfig | None = getattr(self.assoc, "node_config", None)
        if policy is not None and policy.allowed_callers:
            calling = self.requestor.primitive.calling_ae_title.strip()  # type: ignore[union-attr]
            address = self.assoc.requestor.address
            if not policy.caller_allowed(calling, address):
                LOG.warning(
                    "rejecting association from %s at %s: calling AE title not allowed",
                    calling,
                    address,
                )
                self.send_reject(0x01, 0x01, 0x03)
                evt.trigger(self.assoc, evt.EVT_REJECTED, {})
                self.assoc.kill()
                return
        super()._negotiate_as_acceptor()


class NodeRequestHandler(FastRequestHandler):
    """Creates event-driven associations that carry the node's policy and use NodeACSE."""

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


class StoreSCP:
    """The C-ECHO/C-STORE service provider of the node."""

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        index: Index,
        on_released: Callable[[], None] | None = None,
        audit: Audit | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.index = index
        self._on_released = on_released
        self.audit: Audit = audit or NullAudit()
        rc = config.retention
        self.disk_guard = DiskGuard(config.storage, int(rc.min_free_gb * 1e9), rc.min_free_ratio)
        self._server: NodeAssociationServer | None = None
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

        class _Server(NodeAssociationServer):
            node_config = cfg
            adopted_socket = sock

        server = ae.make_server(
            (cfg.bind_address, cfg.port), evt_handlers=handlers, server_class=_Server
        )
        ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dimse-accept",
            daemon=True,
        )
        thread.start()
        self._server = server
        host, port = server.server_address[:2]
        LOG.info("DIMSE SCP %s listening on %s:%s", cfg.ae_title, host, port)
        return str(host), int(port)

    @property
    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop_accepting(self) -> None:
        """Stop listening; associations already open go on."""
        server = self._server
        if server is None:
            return
        server.shutdown()  # stops serve_forever and closes the listening socket

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no association is open (or ``timeout``); True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server is None or not self._server.active_associations:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: no new associations, finish stores in flight, then abort the rest."""
        server = self._server
        if server is None:
            return
        self.stop_accepting()
        if not self.wait_idle(timeout):
            LOG.warning("associations still open after %.0f s; aborting them", timeout)
            with self._in_flight_cv:
                self._in_flight_cv.wait_for(lambda: self._in_flight == 0, timeout=10)
            for assoc in server.active_associations:
                assoc.abort()
        self._server = None

    # -- event handlers -----------------------------------------------------

    def _audit_association(self, event: evt.Event, accepted: bool) -> None:
        from dicomnode.audit import events

        rq = event.assoc.requestor
        self.audit.record(events.association,
            accepted, rq.ae_title.strip(), self.config.ae_title, rq.address,
            reason=None if accepted else "calling AE title, address or called AE not allowed",
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
