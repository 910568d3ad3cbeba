"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for slow clients and a connection cap.

uvicorn bounds only the idle time between two requests (``timeout_keep_alive``) and
answers 503 to *requests* beyond ``limit_concurrency``. A client that opens connections
and sends its request head a byte at a time (slowloris), or stops half-way through a
body, holds a connection (and, for STOW-RS, a temp file) for ever, and a few hundred of
them turn every real client away. :class:`GuardedH11Protocol` adds:

* a **head deadline**: a connection that has not sent a complete request head within
  ``header_timeout`` of its start (or of the end of its previous response) is closed;
* a **body deadline**: a request body from which nothing arrives for ``body_timeout``
  is dropped (the application sees the client disconnect and removes what it
  buffered); time while the node itself has paused reading does not count;
* a **connection cap** that does not lock real clients out: at ``max_connections``,
  a new connection closes the oldest one still sending its request head (the likeliest
  to be stalled); only when every connection is busy with a request is the new one
  answered 503 and closed.

Relies on uvicorn's ``H11Protocol`` attributes ``conn``, ``connections``, ``transport``,
``flow`` and ``loop`` and its ``on_response_complete`` hook (uvicorn 0.30 to 0.54 keep
them, and pyproject.toml bounds it there; ``tests/test_http_hardening.py`` pins the
names and the behaviour with real sockets).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LOG = logging.getLogger(__name__)

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n" \
        b"connection: close\r\nretry-after: 5\r\n\r\nbusy\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines (seconds) and the connection cap of one HTTP server."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a number of seconds > 0, not {value!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(f"max_connections: must be an integer >= 1, not "
                             f"{self.max_connections!r}")


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedH11Protocol(H11Protocol):
    """See the module docstring. Use :func:`guarded_protocol` to set ``limits``."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened = 0.0
        self._phase_start = 0.0   # start of the head being waited for
        self._in_head = True      # waiting for a (next) request head
        self._last_body = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._opened = self._phase_start = self._last_body = now
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            LOG.warning("HTTP connection refused: %d connections open, none idle",
                        len(self.connections) - 1)
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._observe()
        if self.conn.their_state is h11.SEND_BODY:
            self._last_body = self.loop.time()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._observe()

    def _observe(self) -> None:
        """Follow the client's side: IDLE is waiting for a head (its deadline starts when
        IDLE is first seen), anything else is a request under way."""
        if self.conn.their_state is h11.IDLE:
            if not self._in_head:
                self._in_head = True
                self._phase_start = self.loop.time()
        else:
            self._in_head = False

    # -- deadlines -------------------------------------------------------------------

    def _arm(self) -> None:
        delay = min(1.0, self.limits.header_timeout, self.limits.body_timeout)
        self._timer = self.loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        self._observe()
        if self._in_head:
            if now - self._phase_start > self.limits.header_timeout:
                self._drop("no complete request head within "
                           f"{self.limits.header_timeout:g} s")
                return
        elif self.conn.their_state is h11.SEND_BODY:
            if self.flow.read_paused:  # the node is not reading: the client is not late
                self._last_body = now
            elif now - self._last_body > self.limits.body_timeout:
                self._drop(f"request body stalled for {self.limits.body_timeout:g} s")
                return
        self._arm()

    def _drop(self, why: str) -> None:
        client = self.client[0] if self.client else "?"
        LOG.info("HTTP connection from %s closed: %s", client, why)
        self.transport.close()

    def _make_room(self) -> bool:
        """At the cap: close the oldest connection still sending a request head."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c._in_head
                and c.conn.their_state is h11.IDLE and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._phase_start)
        oldest._drop("connection cap reached; the oldest connection without a request"
                     " head makes room")
        self.connections.discard(oldest)
        return True
