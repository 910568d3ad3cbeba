"""Every override of pynetdicom's internals, in one place (pynetdicom 3.0.4, pinned).

The node's DIMSE door needs more than pynetdicom's public API gives: a faster,
event-driven receive loop, an allowlist that also looks at the caller's address and a
per-caller association limit decided at association time, TLS handshakes off the
accepting thread, and adopting an already listening socket. Each of those overrides a
private method or attribute of pynetdicom, listed in :data:`OVERRIDES` (name and
signature); ``tests/test_pynetdicom_pin.py`` checks that the installed pynetdicom still
has each one as written, and fails naming the one that changed, so an upgrade cannot
break the receive path silently.

**Event-driven reactors.** Stock pynetdicom polls: the association reactor sleeps 1 ms per loop before
looking for a DIMSE message, and the DUL reactor sleeps 1 ms and polls the socket
when idle, which adds milliseconds of latency to every C-STORE. Here:

* ``FastAssociation`` waits on a ``threading.Event`` set whenever a complete DIMSE
  message or an ACSE primitive is queued for it;
* ``FastDUL`` blocks in ``select()`` on the peer socket plus a wake-up pipe written
  whenever a primitive is queued to send;
* ``FastAssociationSocket`` reads each PDU with ``recv_into`` into one buffer.

The checks each loop makes (DIMSE message, A-RELEASE, abort, DUL alive, network
idle timeout, ARTIM) and their order are pynetdicom's own; timers are still noticed
within ``IDLE_POLL_S``.

**Policy at association time.** :class:`NodeACSE` enforces the config's allowlist
(AE title + source address), the per-caller limit and the association slots, counted
only once a request has arrived; :class:`NodeRequestHandler` does TLS handshakes in the
connection's thread and attaches the policy; :class:`NodeAssociationServer` can adopt a
listening socket so that several receiving processes share one port, and keeps
connections that send no A-ASSOCIATE-RQ in check (:mod:`dicomnode.ingest.pending`).

**Bounded memory.** PDUs are length-checked before they are read and C-STORE data sets
stream to the spool as they arrive (:mod:`dicomnode.ingest.pynetdicom_dimse`, whose
private names are pinned in this module's :data:`OVERRIDES` too).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode.ingest.pending import PendingConnections, take_slot
from dicomnode.ingest.pynetdicom_dimse import (
    SinkFactory,
    StreamingDIMSE,
    discard_streamed,
    read_pdu_data,
)

if TYPE_CHECKING:
    from dicomnode.config import NodeConfig

LOG = logging.getLogger(__name__)

#: The pinned pynetdicom version these overrides were written against.
PYNETDICOM_VERSION = "3.0.4"

#: Every private pynetdicom name overridden or relied on: (module, qualified name,
#: signature as ``str(inspect.signature(...))``, or None for an attribute: a class
#: attribute, or an instance attribute that the class's ``__init__`` sets).
OVERRIDES: tuple[tuple[str, str, str | None], ...] = (
    ("pynetdicom.dul", "DULServiceProvider.__init__", "(self, assoc: 'Association') -> None"),
    ("pynetdicom.dul", "DULServiceProvider.run_reactor", "(self) -> None"),
    ("pynetdicom.dul", "DULServiceProvider.kill_dul", "(self) -> None"),
    ("pynetdicom.dul", "DULServiceProvider.stop_dul", "(self) -> bool"),
    ("pynetdicom.dul", "DULServiceProvider._process_recv_primitive", "(self) -> bool"),
    ("pynetdicom.dul", "DULServiceProvider._is_transport_event", "(self) -> bool"),
    ("pynetdicom.dul", "DULServiceProvider.idle_timer_expired", "(self) -> bool"),
    ("pynetdicom.transport", "AssociationSocket.recv", "(self, nr_bytes: int) -> bytearray"),
    ("pynetdicom.association", "Association.__init__", "(self, ae: 'ApplicationEntity', mode: str) -> None"),
    ("pynetdicom.association", "Association._run_reactor", "(self) -> None"),
    ("pynetdicom.association", "Association._serve_request",
     "(self, msg: 'C_ECHO | C_FIND | C_GET | C_MOVE | C_STORE | N_ACTION | N_CREATE"
     " | N_DELETE | N_EVENT_REPORT | N_GET | N_SET', context_id: int) -> None"),
    ("pynetdicom.association", "Association.kill", "(self) -> None"),
    ("pynetdicom.transport", "RequestHandler._create_association", "(self) -> 'Association'"),
    ("pynetdicom.transport", "RequestHandler.handle", "(self) -> None"),
    ("pynetdicom.acse", "ACSE._negotiate_as_acceptor", "(self) -> None"),
    ("pynetdicom.acse", "ACSE.send_reject", "(self, result: int, source: int, diagnostic: int) -> None"),
    ("pynetdicom.transport", "ThreadedAssociationServer.server_bind", None),
    ("pynetdicom.transport", "ThreadedAssociationServer.server_activate", None),
    ("pynetdicom.transport", "ThreadedAssociationServer.get_request", None),
    ("pynetdicom.ae", "ApplicationEntity._servers", None),
    ("pynetdicom.association", "Association._dul_ready", None),
    ("pynetdicom.association", "Association._reactor_checkpoint", None),
    ("pynetdicom.association", "Association._is_paused", None),
    ("pynetdicom.association", "Association._kill", None),
    ("pynetdicom.association", "Association._server", None),
    ("pynetdicom.dul", "DULServiceProvider._kill_thread", None),
    ("pynetdicom.dul", "DULServiceProvider._idle_timer", None),
    ("pynetdicom.transport", "AssociationSocket._is_connected", None),
    ("pynetdicom.transport", "AssociationServer._handlers", None),
    ("pynetdicom", "_config.UNRESTRICTED_STORAGE_SERVICE", None),
    ("pynetdicom", "_config.LOG_HANDLER_LEVEL", None),
    # bounded PDU reads and C-STORE data sets streamed to the spool (pynetdicom_dimse.py)
    ("pynetdicom.dul", "DULServiceProvider._read_pdu_data", "(self) -> None"),
    ("pynetdicom.dul", "DULServiceProvider._decode_pdu",
     "(self, bytestream: bytearray) -> tuple['A_ASSOCIATE_RQ | A_ASSOCIATE_AC |"
     " A_ASSOCIATE_RJ | P_DATA_TF | A_RELEASE_RQ | A_RELEASE_RP | A_ABORT_RQ', str]"),
    ("pynetdicom.dul", "DULServiceProvider._recv_pdu", None),
    ("pynetdicom.dimse", "DIMSEServiceProvider.receive_primitive",
     "(self, primitive: 'P_DATA') -> None"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.message", None),
    ("pynetdicom.dimse", "DIMSEServiceProvider.cancel_req", None),
    ("pynetdicom.dimse_messages", "_MESSAGE_TYPES", None),
    ("pynetdicom.association", "Association._accepted_cx", None),
    ("pynetdicom.dimse_messages", "DIMSEMessage.encoded_command_set", None),
    ("pynetdicom.dimse_messages", "DIMSEMessage.data_set", None),
    ("pynetdicom.dimse_messages", "DIMSEMessage.message_to_primitive",
     "(self) -> 'C_CANCEL | DimseServiceType'"),
    # connections without an A-ASSOCIATE-RQ: deadline, pending caps, slots (pending.py)
    ("pynetdicom.association", "Association.run_reactor", "(self) -> None"),
    ("pynetdicom.transport", "ThreadedAssociationServer.process_request",
     "(self, request, client_address)"),
    ("pynetdicom.transport", "AssociationServer.service_actions", "(self) -> None"),
    ("pynetdicom.transport", "AssociationServer.server_close", "(self) -> None"),
)

#: Longest sleep without a wake-up: bounds how late ARTIM / idle timeouts and a
#: dead DUL thread are noticed. Traffic, release and abort wake the reactors at once.
IDLE_POLL_S = 0.05


class _SignallingQueue(queue.Queue[Any]):
    """A :class:`queue.Queue` that calls `notify` after every ``put()``."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class FastDUL(DULServiceProvider):
    """DUL provider that blocks in ``select()`` instead of sleep-polling.

    The reactor waits for: data on the peer socket, a byte on an internal wake
    pipe (written whenever a primitive is queued to ``to_provider_queue`` or the
    DUL is asked to stop), or :data:`IDLE_POLL_S` (so ARTIM expiry is still
    checked). The loop body is identical to pynetdicom's.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.to_provider_queue = _SignallingQueue(self._wake)
        self._rq_seen = False

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (already woken) or closed (reactor gone)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _wait_idle(self) -> None:
        """Block until socket data, a wake-up, or IDLE_POLL_S."""
        fds: list[Any] = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and self.socket._is_connected:  # type: ignore[union-attr]
            pending = getattr(sock, "pending", None)  # ssl.SSLSocket buffers data
            if pending is not None and pending():
                return
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], IDLE_POLL_S)
        except (OSError, ValueError):
            # Socket closed under us; let _is_transport_event()/ready emit Evt17
            return
        if self._wake_r in ready:
            self._drain_wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            if threading.current_thread() is not self:
                self.join()
            return True
        return False

    def run_reactor(self) -> None:
        try:
            self._run_reactor_inner()
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def _run_reactor_inner(self) -> None:
        self._idle_timer.start()
        assert self.socket is not None
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()

            if idle:
                self._wait_idle()

            if self._kill_thread:
                break

            # ARTIM first, so its event is queued ahead of anything else
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # identical to pynetdicom's handling
                LOG.error("Exception in DUL.run(), aborting association")
                LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue

            self.state_machine.do_action(event)
            idle = False
            if event == "Evt6":
                self._rq_seen = True
            elif (self.state_machine.current_state == "Sta1" and not self._rq_seen
                  and self.assoc.is_acceptor):
                # closed (or ARTIM expired) before any A-ASSOCIATE-RQ: wake the
                # association, which waits for the request, so that it ends now
                self._rq_seen = True
                self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _read_pdu_data(self) -> None:
        """Bounded: a PDU longer than we accept is refused before it is read
        (:func:`dicomnode.ingest.pynetdicom_dimse.read_pdu_data`)."""
        read_pdu_data(self, int(self.assoc.acceptor.maximum_length or 0))


class FastAssociationSocket(AssociationSocket):
    """``recv()`` straight into one buffer of the requested size."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        nr_read = 0
        while nr_read < nr_bytes:
            n = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not n:  # connection closed, return what we have (as stock)
                del view
                del buf[nr_read:]
                return buf
            nr_read += n
        return buf


class FastAssociation(Association):
    """Acceptor ``Association`` with an event-driven reactor loop.

    The reactor sleeps on ``self._wake`` which is set whenever
    ``dimse.msg_queue`` or ``dul.to_user_queue`` receives an item, the
    association is killed, or at most every :data:`IDLE_POLL_S` seconds.
    The checks done per loop (DIMSE message, peer A-RELEASE, abort, DUL alive,
    network idle timeout) and their order are exactly pynetdicom's.
    """

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        # Replace the DUL (not started yet) and re-apply the timeouts that the
        # base __init__ pushed into the old DUL's timers.
        self.dul = FastDUL(self)
        self.dul.to_user_queue = _SignallingQueue(self._wake.set)
        self.dimse = StreamingDIMSE(self)
        self.dimse.msg_queue = _SignallingQueue(self._wake.set)
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        try:
            self._run_reactor_loop()
        finally:
            # data sets still arriving or queued but never served are not kept
            dimse = self.dimse
            if isinstance(dimse, StreamingDIMSE):
                dimse.close()

    def _run_reactor_loop(self) -> None:
        self._is_paused = False
        while not self._kill:
            # Idle wait happens *inside* the paused section, so a thread that
            # calls release()/abort()/send_*() on this association does not
            # have to wait for the timeout.
            self._is_paused = True
            self._wake.wait(IDLE_POLL_S)
            self._reactor_checkpoint.wait()
            self._is_paused = False
            # Clear before looking, so a put() that races with the checks below
            # makes the next wait() return immediately.
            self._wake.clear()

            # Drain all complete DIMSE messages before looking at ACSE, as the
            # stock loop does one message per 1 ms iteration.
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                try:
                    self._serve_request(msg, context_id)  # type: ignore[arg-type]
                finally:
                    discard_streamed(msg)  # a no-op once the spool adopted it
                self._wake.set()  # more may be queued; loop without waiting
                continue

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOG.error("Network timeout reached")
                if isinstance(self.dimse, StreamingDIMSE):
                    self.dimse.close()  # before the peer hears of it
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class FastRequestHandler(RequestHandler):
    """Request handler creating :class:`FastAssociation` acceptors.

    Same as ``RequestHandler._create_association`` in pynetdicom 3.0.4 except
    for the two classes used.
    """

    association_class: type[Association] = FastAssociation
    socket_class: type[AssociationSocket] = FastAssociationSocket

    def _create_association(self) -> Association:
        assoc = self.association_class(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = self.socket_class(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        handlers: dict[Any, Any] = self.server._handlers
        for event in handlers:
            if event.is_intervention and handlers[event]:
                assoc.bind(event, *handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class NodeACSE(ACSE):
    """ACSE that enforces the config's allowlist of callers (AE title + host), the
    per-caller association limit and the association slots.

    pynetdicom's own check knows only AE titles; ours adds the source address. A
    refused peer gets A-ASSOCIATE-RJ, permanent, service-user, "calling AE title not
    recognized" (PS3.8 9.3.4). A caller already holding
    ``ingest.max_associations_per_caller`` associations, or any caller when
    ``ingest.max_associations`` are open, gets A-ASSOCIATE-RJ, transient,
    service-provider (presentation), "local limit exceeded" (2, 3, 2). Slots are
    counted here, when the A-ASSOCIATE-RQ has arrived, and only for associations that
    got this far: a connection that never sends its request holds none (pynetdicom
    counts every connection; the StoreSCP sets the AE's own limit out of reach).
    """

    def _reject(self, result: int, source: int, diagnostic: int, reason: str) -> None:
        self.assoc.dicomnode_reject_reason = reason  # type: ignore[attr-defined]
        self.send_reject(result, source, diagnostic)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _negotiate_as_acceptor(self) -> None:
        assoc = self.assoc
        pending: PendingConnections | None = getattr(assoc._server, "pending", None)
        if pending is not None:
            pending.done(getattr(assoc.dul.socket, "socket", None))
        # the request is in: from now on the configured ACSE timeout applies
        # (NodeRequestHandler shortened it, and ARTIM with it, to the request deadline)
        configured = getattr(assoc, "dicomnode_acse_timeout", None)
        if configured is not None:
            assoc.acse_timeout = configured
        policy: NodeConfig | None = getattr(assoc, "node_config", None)
        calling = self.requestor.primitive.calling_ae_title.strip()  # type: ignore[union-attr]
        address = assoc.requestor.address
        if policy is not None and policy.allowed_callers:
            if not policy.caller_allowed(calling, address):
                LOG.warning(
                    "rejecting association from %s at %s: calling AE title not allowed",
                    calling,
                    address,
                )
                self._reject(0x01, 0x01, 0x03, "calling AE title or address not allowed")
                return
        if policy is not None:
            refused = take_slot(assoc, calling, policy.ingest.max_associations,
                                policy.ingest.max_associations_per_caller)
            if refused:
                LOG.warning("rejecting association from %s at %s: %s", calling, address,
                            refused)
                self._reject(0x02, 0x03, 0x02, f"local limit exceeded: {refused}")
                return
        super()._negotiate_as_acceptor()


class NodeRequestHandler(FastRequestHandler):
    """Creates event-driven associations that carry the node's policy, use NodeACSE and
    stream C-STORE data sets to the server's ``dataset_sink_factory``."""

    def handle(self) -> None:
        """Finish the TLS handshake (if any) in this connection's own thread, then run
        the association. A peer that fails the handshake (plain DICOM on a TLS port, no
        or an untrusted client certificate) or stalls in it longer than the request
        deadline (``ingest.associate_rq_timeout``) is logged and disconnected; the
        server goes on."""
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            ic = self.server.node_config.ingest  # type: ignore[attr-defined]
            try:
                sock.settimeout(ic.associate_rq_timeout)
                sock.do_handshake()
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
        config: NodeConfig = self.server.node_config  # type: ignore[attr-defined]
        assoc.node_config = config  # type: ignore[attr-defined]
        assoc.acse = NodeACSE(assoc)
        assert isinstance(assoc.dimse, StreamingDIMSE)
        assoc.dimse.sink_factory = getattr(self.server, "dataset_sink_factory", None)
        # Until the A-ASSOCIATE-RQ is in, the ACSE timeout (and so ARTIM, PS3.8 9.1.5,
        # and the association's wait for the request) is the short request deadline;
        # NodeACSE restores the configured one.
        assoc.dicomnode_acse_timeout = assoc.acse_timeout  # type: ignore[attr-defined]
        assoc.acse_timeout = config.ingest.associate_rq_timeout
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # a peer that stops in the middle of a PDU is dropped after the network
                # timeout instead of holding its thread (and slot) forever
                raw.settimeout(config.ingest.network_timeout)
            except OSError:
                pass
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """A threaded association server that can adopt an already listening socket and
    keeps connections that have not sent their A-ASSOCIATE-RQ in check
    (:class:`~dicomnode.ingest.pending.PendingConnections`).

    Several receiving processes can then share one port: the parent creates and
    binds the socket, each child adopts it.
    """

    node_config: NodeConfig
    adopted_socket: socket.socket | None = None
    #: listen backlog (socketserver's is 5: a burst of connections, idle ones included,
    #: would make the kernel drop a sender's SYN, costing it a 1 s retransmission)
    request_queue_size = 128
    #: makes the sink each C-STORE data set is streamed to (None: kept in memory)
    dataset_sink_factory: SinkFactory | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        ic = self.node_config.ingest
        self.pending = PendingConnections(deadline=ic.associate_rq_timeout,
                                          per_address=ic.max_pending_per_address,
                                          total=ic.max_pending_connections)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.adopted_socket is not None:
            if self.socket is not None:
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

    def process_request(self, request: Any, client_address: Any) -> None:
        """Register the connection as pending (closing it, or an older idle one, over
        the caps), then serve it in its own thread."""
        if not self.pending.add(request, str(client_address[0])):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        """Every poll interval of the accept loop: close connections past the deadline."""
        super().service_actions()
        self.pending.reap()

    def server_close(self) -> None:
        self.pending.close_all()
        super().server_close()
