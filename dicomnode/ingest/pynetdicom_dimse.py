"""Bounded memory on the DIMSE door: how PDUs are read and DIMSE messages assembled.

Part of the pynetdicom overrides (pynetdicom 3.0.4, pinned); every private name used
here is listed in :data:`dicomnode.ingest.pynetdicom_ext.OVERRIDES`, which
``tests/test_pynetdicom_pin.py`` checks against the installed pynetdicom.

Stock pynetdicom holds a whole C-STORE data set in memory before the handler sees it:
each P-DATA fragment is appended to a ``BytesIO`` until the last one arrives (PS3.8
Annex E.2), and each PDU is read whole, whatever length its header announces. Here:

* :func:`read_pdu_data` reads a PDU into one buffer of its announced length, but only
  up to a limit: a P-DATA-TF PDU longer than the Maximum Length we advertised
  (PS3.8 D.1, ``ingest.max_pdu_size``), or any other PDU longer than
  :data:`MAX_CONTROL_PDU`, is an invalid PDU (Evt19: the association is aborted);
* :class:`StreamingDIMSE` assembles messages as pynetdicom's
  ``DIMSEMessage.decode_msg`` / ``DIMSEServiceProvider.receive_primitive`` do, except
  that the data set fragments of a C-STORE-RQ go to a *sink* as they arrive (the node's
  sink writes them to a temp file in the spool's ``tmp/`` folder,
  :mod:`dicomnode.ingest.streaming`), opened as soon as the command set is complete:
  PS3.7 9.3.1.1 and PS3.8 E.2 put every command fragment before the data set's. The
  finished sink's result travels on the C-STORE primitive as ``dicomnode_streamed``.
  Command sets and the data sets of other messages (which the node does not serve)
  stay in memory, capped (:data:`MAX_COMMAND_SET`, :data:`MAX_OTHER_DATA_SET`).

So a node receiving one 4 GB instance holds at most one PDU and one write buffer of it
in memory. Unlike stock, a P-DATA PDU that carries the last fragment of one message and
the first of the next is assembled as two messages (stock drops the rest of the PDU).
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.utils import make_target

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu_primitives import P_DATA

LOG = logging.getLogger(__name__)

#: Largest PDU other than P-DATA-TF read (an A-ASSOCIATE-RQ with 128 presentation
#: contexts of 20 transfer syntaxes each and a 64 KiB user identity is ~250 KiB).
MAX_CONTROL_PDU = 1 << 20
#: Largest command set (PS3.7 9.3, E.1): a few hundred bytes in practice.
MAX_COMMAND_SET = 64 << 10
#: Largest data set of a message other than C-STORE-RQ (the node serves only C-ECHO
#: and C-STORE; a C-FIND identifier or N-service data set is small).
MAX_OTHER_DATA_SET = 1 << 20

_PDU_HEADER = struct.Struct(">BBL")


class DatasetSink(Protocol):
    """Where a C-STORE data set goes, fragment by fragment, as it arrives."""

    def write(self, data: memoryview) -> None:
        """One fragment's bytes (valid only during the call)."""

    def finish(self) -> Any:
        """The last fragment has arrived: what the C-STORE handler gets."""

    def discard(self) -> None:
        """The message will never complete (association ended): drop what was kept."""


class SinkFactory(Protocol):
    def __call__(self, assoc: Association, context_id: int, command_set: Dataset
                 ) -> DatasetSink: ...


class _InvalidMessage(Exception):
    """The peer broke PS3.7/PS3.8 message rules: the association is aborted."""


def _recv_exactly(sock: Any, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; returns the bytes read (fewer: connection closed)."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if not n:
            break
        got += n
    return got


def read_pdu_data(dul: DULServiceProvider, max_p_data: int) -> None:
    """``DULServiceProvider._read_pdu_data`` with the PDU length checked before the
    PDU is read, and read into one buffer (stock reads it, then copies it).

    ``max_p_data``: the Maximum Length we advertised (0: no limit). Events are the
    stock ones: Evt6/3/4/10/12/13/16 for the PDU, Evt17 when the connection closes
    mid-PDU, Evt19 for an unknown, undecodable or over-long PDU.
    """
    assoc_sock = dul.socket
    raw = getattr(assoc_sock, "socket", None)
    if raw is None:
        dul.event_queue.put("Evt17")
        return
    header = bytearray(6)
    try:
        got = _recv_exactly(raw, memoryview(header))
    except (OSError, TimeoutError) as exc:
        LOG.debug("connection closed before a PDU header was received: %s", exc)
        dul.event_queue.put("Evt17")
        return
    if got != 6:
        dul.event_queue.put("Evt17")
        return
    pdu_type, _, length = _PDU_HEADER.unpack(header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        LOG.error("Unknown PDU type received '0x%02X'", pdu_type)
        dul.event_queue.put("Evt19")
        return
    limit = max_p_data if pdu_type == 0x04 else MAX_CONTROL_PDU
    if limit and length > limit:
        LOG.warning("aborting the association with %s: a PDU of type 0x%02X announces %d"
                    " bytes, more than the %d allowed (PS3.8 D.1)",
                    dul.assoc.requestor.address, pdu_type, length, limit)
        dul.event_queue.put("Evt19")
        return
    pdu = bytearray(6 + length)
    pdu[:6] = header
    try:
        got = _recv_exactly(raw, memoryview(pdu)[6:])
    except (OSError, TimeoutError) as exc:
        LOG.error("Connection closed before the entire PDU was received: %s", exc)
        dul.event_queue.put("Evt17")
        return
    if got != length:
        LOG.error("The received PDU is shorter than expected (%d of %d bytes received)",
                  6 + got, 6 + length)
        dul.event_queue.put("Evt17")
        return
    try:
        decoded, event = dul._decode_pdu(pdu)
        dul.event_queue.put(event)
    except Exception as exc:
        LOG.error("Unable to decode the received PDU data")
        LOG.exception(exc)
        dul.event_queue.put("Evt19")
        return
    dul._recv_pdu.put(decoded)


class StreamingDIMSE(DIMSEServiceProvider):
    """A DIMSE provider that streams C-STORE data sets to a sink (see the module).

    ``sink_factory`` (set by the request handler) makes the sink for each C-STORE-RQ
    once its command set is complete; without one, data sets are kept in memory as
    stock pynetdicom does (capped for messages other than C-STORE-RQ).
    """

    sink_factory: SinkFactory | None = None

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._sink: DatasetSink | None = None
        self._command_bytes = 0
        self._data_bytes = 0
        self._sink_lock = threading.Lock()

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Assemble P-DATA fragments into DIMSE messages (PS3.8 Annex E)."""
        try:
            for context_id, data in primitive.presentation_data_value_list:
                if self.message is None:
                    self.message = DIMSEMessage()
                    self._command_bytes = self._data_bytes = 0
                if self._fragment(self.message, context_id, data):
                    msg, self.message = self.message, None
                    self._dispatch(msg)
        except Exception as exc:
            if isinstance(exc, _InvalidMessage):
                LOG.warning("aborting the association with %s: %s",
                            self.assoc.requestor.address, exc)
            else:
                LOG.error("Received an invalid DIMSE message")
                LOG.exception(exc)
            self._discard_partial()
            self.message = None
            self.dul.event_queue.put("Evt19")  # A-ABORT (AA-8)

    def _fragment(self, msg: DIMSEMessage, context_id: int, data: bytes) -> bool:
        """Add one PDV to ``msg`` (``decode_msg``'s logic); True when it is complete."""
        if not data:
            raise _InvalidMessage("a presentation data value without a message header")
        control = data[0]
        payload = memoryview(data)[1:]
        if control & 1:  # command fragment (xxxxxx01 / xxxxxx11)
            self._command_bytes += len(payload)
            if self._command_bytes > MAX_COMMAND_SET:
                raise _InvalidMessage(f"a command set longer than {MAX_COMMAND_SET} bytes")
            msg.encoded_command_set.write(payload)
            if not control & 2:
                return False
            msg.context_id = context_id
            msg.command_set = decode(msg.encoded_command_set, True, True)
            msg.__class__ = _MESSAGE_TYPES[cast(int, msg.command_set.CommandField)][1]
            if msg.command_set.CommandDataSetType == 0x0101:
                return True  # no data set
            if isinstance(msg, C_STORE_RQ) and self.sink_factory is not None:
                new_sink = self.sink_factory(self.assoc, context_id, msg.command_set)
                with self._sink_lock:
                    self._sink = new_sink
            return False
        # data set fragment (xxxxxx00 / xxxxxx10)
        sink = self._sink
        if sink is not None:
            sink.write(payload)
        else:
            self._data_bytes += len(payload)
            if not isinstance(msg, C_STORE_RQ) and self._data_bytes > MAX_OTHER_DATA_SET:
                raise _InvalidMessage(f"a data set of a {type(msg).__name__} message longer"
                                      f" than {MAX_OTHER_DATA_SET} bytes")
            cast(Any, msg.data_set).write(payload)
        return bool(control & 2)

    def _dispatch(self, msg: DIMSEMessage) -> None:
        """A complete message: to the association's queue, as stock does."""
        with self._sink_lock:
            sink, self._sink = self._sink, None
        streamed = sink.finish() if sink is not None else None
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": msg})
        context_id = cast(int, msg.context_id)
        try:
            d_primitive = msg.message_to_primitive()
        except Exception as exc:
            if streamed is not None:
                streamed.discard()
            raise _InvalidMessage(f"an invalid {type(msg).__name__} message: {exc}") from exc
        if streamed is not None:
            d_primitive.dicomnode_streamed = streamed  # type: ignore[union-attr]
        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, d_primitive.MessageIDBeingRespondedTo)] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request),
                             args=(d_primitive, context_id)).start()
        else:
            self.msg_queue.put((context_id, d_primitive))  # type: ignore[arg-type]

    def _discard_partial(self) -> None:
        with self._sink_lock:
            sink, self._sink = self._sink, None
        if sink is not None:
            sink.discard()

    def close(self) -> None:
        """Drop a data set still arriving and those queued but never served (the
        association has ended). Idempotent."""
        self._discard_partial()
        while True:
            try:
                _, msg = self.msg_queue.get_nowait()
            except Exception:  # queue.Empty
                return
            if msg is not None:
                discard_streamed(msg)


def discard_streamed(primitive: Any) -> None:
    """Discard the streamed data set a DIMSE primitive carries, if any (a no-op once
    the data set was adopted by the spool, or already discarded)."""
    streamed = getattr(primitive, "dicomnode_streamed", None)
    if streamed is not None:
        try:
            streamed.discard()
        except Exception:
            LOG.exception("cannot discard a received data set")
