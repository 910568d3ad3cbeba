"""The one object stages use to audit: ``audit.record(events.builder, *args)``.

``AuditRecorder`` writes each event (PS3.15 A.5, see ``events``) into the
encrypted, hash-chained trail, and forwards it to an ATNA audit repository when
one is configured. ``NullAudit`` is used where auditing is off (and in unit tests).
Recording never raises into the caller: the event is built inside ``record`` so
that a builder error, like a write error, is logged loudly and the stage goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dicomnode.audit.codec import to_dict, to_xml

if TYPE_CHECKING:
    from dicomnode.audit.forward import Forwarder
    from dicomnode.audit.model import AuditEvent, NodeIdentity
    from dicomnode.audit.trail import AuditTrail

LOG = logging.getLogger(__name__)


class Audit(Protocol):
    def record(self, build: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...


class NullAudit:
    """Auditing switched off: nothing is even built."""

    def record(self, build: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        return None


class AuditRecorder:
    """Trail (required) plus forwarder (optional)."""

    def __init__(self, trail: AuditTrail, forwarder: Forwarder | None = None,
                 node: NodeIdentity | None = None) -> None:
        self.trail = trail
        self.forwarder = forwarder
        self.node = node  # the audit source; None: the builders' default

    def record(self, build: Callable[..., AuditEvent], *args: Any, **kwargs: Any) -> None:
        try:
            event = build(*args, node=self.node, **kwargs)
        except Exception:
            LOG.exception("cannot build the audit event %s", getattr(build, "__name__", build))
            return
        try:
            self.trail.append(to_dict(event))
        except Exception:
            LOG.exception("cannot write an audit record")
        if self.forwarder is not None:
            try:
                self.forwarder.enqueue(to_xml(event))
            except Exception:
                LOG.exception("cannot queue an audit message for forwarding")

    def close(self) -> None:
        try:
            self.trail.close()
        finally:
            if self.forwarder is not None:
                self.forwarder.stop()
