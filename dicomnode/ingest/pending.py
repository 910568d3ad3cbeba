"""Connections accepted on the DIMSE port whose A-ASSOCIATE-RQ has not arrived yet.

A TCP connection that never sends an A-ASSOCIATE-RQ costs a thread and, in stock
pynetdicom, an association slot until the ARTIM timer (the ACSE timeout) expires, so a
few dozen idle sockets lock every sender out. The node instead:

* gives a connection ``ingest.associate_rq_timeout`` seconds to deliver its whole
  A-ASSOCIATE-RQ (and finish the TLS handshake before it): the ARTIM timer of PS3.8
  9.1.5 for the silent case, and :meth:`PendingConnections.reap` for a peer that
  trickles a partial PDU;
* holds at most ``ingest.max_pending_per_address`` such connections per source address
  and ``ingest.max_pending_connections`` in all: a new connection over either cap
  closes the oldest idle pending one (one with no bytes waiting to be read), so that a
  sender connecting from the same address as the idle sockets, which sends its request
  within milliseconds, is still served; when none is idle the new one is closed;
* counts association slots (``ingest.max_associations``) only for associations that
  reached negotiation (:class:`dicomnode.ingest.pynetdicom_ext.NodeACSE`).

Closing is ``shutdown(SHUT_RDWR)`` on the socket, from the accepting thread: the
connection's own thread then sees the end of the stream and ends as after any closed
connection (PS3.8 Evt17).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LOG = logging.getLogger(__name__)

#: Seconds between two warnings about closed idle connections from one address.
WARN_EVERY_S = 10.0
#: Held while an association's slot is decided, so that two requests arriving together
#: cannot both take the last one.
_SLOTS_LOCK = threading.Lock()


def take_slot(assoc: Any, calling: str, limit: int, per_caller: int | None) -> str:
    """Give the acceptor association ``assoc`` (its A-ASSOCIATE-RQ just arrived, from
    ``calling``) one of ``limit`` slots, at most ``per_caller`` per calling AE title,
    shared by every server of its AE. Returns why not, or "" when it got one."""
    with _SLOTS_LOCK:
        held = [other for other in assoc.ae.active_associations
                if other is not assoc and other.is_acceptor
                and getattr(other, "dicomnode_slot", False)
                and not (other.is_released or other.is_aborted or other.is_rejected)]
        mine = sum(1 for a in held if a.requestor.ae_title.strip() == calling)
        if per_caller is not None and mine >= per_caller:
            return f"it already holds {per_caller} (the limit per caller)"
        if len(held) >= limit:
            return f"{limit} associations are open (ingest.max_associations)"
        assoc.dicomnode_slot = True
        return ""


@dataclass
class _Entry:
    sock: socket.socket
    address: str
    since: float


@dataclass
class _Dropped:
    count: int = 0
    warned_at: float = field(default=-WARN_EVERY_S)


class PendingConnections:
    """Accepted connections awaiting their A-ASSOCIATE-RQ, with per-address and total
    caps and a deadline (see the module). Thread-safe."""

    def __init__(self, *, deadline: float, per_address: int, total: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if deadline <= 0:
            raise ValueError(f"deadline: must be > 0, not {deadline!r}")
        if per_address < 1 or total < 1:
            raise ValueError(f"per_address and total: must be >= 1, not {per_address!r},"
                             f" {total!r}")
        self.deadline = deadline
        self.per_address = per_address
        self.total = total
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # id(sock) -> entry, oldest first
        self._dropped: dict[str, _Dropped] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, sock: socket.socket, address: str) -> bool:
        """Register a just-accepted connection. Over a cap, the oldest idle pending
        connection (of that address for the per-address cap) is closed to make room;
        returns False when there is none: the caller closes ``sock``."""
        now = self._monotonic()
        with self._lock:
            self._forget_closed()
            same = [e for e in self._entries.values() if e.address == address]
            if len(same) >= self.per_address and not self._evict(same, now):
                self._note_drop(address, now)
                return False
            if len(self._entries) >= self.total and not self._evict(
                    list(self._entries.values()), now):
                self._note_drop(address, now)
                return False
            self._entries[id(sock)] = _Entry(sock, address, now)
            return True

    def done(self, sock: object) -> None:
        """The connection's A-ASSOCIATE-RQ arrived (or it ended): no longer pending."""
        with self._lock:
            self._entries.pop(id(sock), None)

    def reap(self) -> int:
        """Close the connections pending for longer than the deadline; returns how many."""
        now = self._monotonic()
        with self._lock:
            self._forget_closed()
            late = [e for e in self._entries.values() if now - e.since >= self.deadline]
            for e in late:
                self._close(e)
                self._note_drop(e.address, now)
        return len(late)

    def close_all(self) -> None:
        """Close every pending connection (the server is stopping)."""
        with self._lock:
            for e in list(self._entries.values()):
                self._close(e)

    # -- under the lock ---------------------------------------------------------------

    def _evict(self, candidates: list[_Entry], now: float) -> bool:
        for e in candidates:  # insertion order: oldest first
            if not _has_data(e.sock):
                self._close(e)
                self._note_drop(e.address, now)
                return True
        return False

    def _close(self, e: _Entry) -> None:
        self._entries.pop(id(e.sock), None)
        try:
            # the base class's shutdown: on an SSLSocket, ssl's own would unset the
            # TLS object under the thread that is using it
            socket.socket.shutdown(e.sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer or its thread

    def _forget_closed(self) -> None:
        for key in [k for k, e in self._entries.items() if e.sock.fileno() < 0]:
            del self._entries[key]

    def _note_drop(self, address: str, now: float) -> None:
        d = self._dropped.setdefault(address, _Dropped())
        d.count += 1
        if now - d.warned_at >= WARN_EVERY_S:
            LOG.warning("closed %d connection(s) from %s that sent no A-ASSOCIATE-RQ in"
                        " time (or over the pending caps)", d.count, address)
            d.count, d.warned_at = 0, now
        if len(self._dropped) > 4096:  # bound the table under a spread-out flood
            self._dropped.clear()


def _has_data(sock: socket.socket) -> bool:
    """Bytes are waiting on ``sock`` (its thread is about to read a request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)
