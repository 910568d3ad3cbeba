"""The one object stages use to audit: ``audit.record(events.builder, *args)``.

``AuditRecorder`` writes each event (PS3.15 A.5, see ``events``) into the
encrypted, hash-chained trail, and forwards it to an ATNA audit repository when
one is configured. ``NullAudit`` is used where auditing is off (and in unit tests).

Two ways to record:

* ``record`` never raises into the caller: the event is built inside it, so that a
  builder error, like a write error, is logged loudly and the stage goes on. For
  events that describe something already done (a job finished, a study completed).
* ``record_durably`` returns once the record is on disk, and raises
  :class:`RecordNotDurable` (a :class:`~dicomnode.errors.StorageUnavailableError`)
  when the trail cannot be written:
  for the records the node must have *before* it acknowledges work (instances
  transferred), so that it fails closed. ``health`` says whether the trail can be
  written now; the front doors refuse new work while it cannot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dicomnode.audit.codec import to_dict, to_xml
from dicomnode.errors import StorageUnavailableError

if TYPE_CHECKING:
    from dicomnode.audit.forward import Forwarder
    from dicomnode.audit.model import AuditEvent, NodeIdentity
    from dicomnode.audit.trail import AuditTrail

LOG = logging.getLogger(__name__)


class RecordNotDurable(StorageUnavailableError):
    """A record the caller needed on disk is not: the trail cannot be written now.

    ``held``: True when the record is queued all the same (kept in memory and written
    once the trail can be written again), False when it was not taken at all."""

    def __init__(self, message: str, *, held: bool) -> None:
        super().__init__(message)
        self.held = held


class Audit(Protocol):
    #: False where auditing is off: nothing is recorded, nothing waits for the trail.
    enabled: bool

    def record(self, build: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...

    def record_durably(self, build: Callable[..., Any], *args: Any,
                       on_durable: Callable[[], None] | None = None, wait: bool = True,
                       **kwargs: Any) -> None: ...

    def health(self) -> tuple[bool, str]: ...


class NullAudit:
    """Auditing switched off: nothing is even built."""

    enabled = False

    def record(self, build: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        return None

    def record_durably(self, build: Callable[..., Any], *args: Any,
                       on_durable: Callable[[], None] | None = None, wait: bool = True,
                       **kwargs: Any) -> None:
        return None

    def health(self) -> tuple[bool, str]:
        return True, "auditing is off"


class AuditRecorder:
    """Trail (required) plus forwarder (optional)."""

    enabled = True

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
        except StorageUnavailableError as exc:  # held records fill the memory bound
            LOG.error("audit record %s dropped: %s", getattr(build, "__name__", build), exc)
        except Exception:
            LOG.exception("cannot write an audit record")
        if self.forwarder is not None:
            try:
                self.forwarder.enqueue(to_xml(event))
            except Exception:
                LOG.exception("cannot queue an audit message for forwarding")

    def record_durably(self, build: Callable[..., AuditEvent], *args: Any,
                       on_durable: Callable[[], None] | None = None, wait: bool = True,
                       **kwargs: Any) -> None:
        """Build the event, queue its record and (``wait``) return once it is on disk.

        Raises :class:`RecordNotDurable` when the record cannot be written now: its
        ``held`` says whether it was queued all the same (held in memory, written once
        the trail can be written again, ``on_durable`` called then) or not at all (the
        caller owes it still). A builder error is a bug and is raised as it is.
        """
        from dicomnode.audit.frames import AuditTrailError

        event = build(*args, node=self.node, **kwargs)
        try:
            seq = self.trail.append(to_dict(event), on_durable=on_durable)
        except AuditTrailError as exc:
            raise RecordNotDurable(f"the audit trail cannot take a record: {exc}",
                                   held=False) from exc
        if self.forwarder is not None:
            try:
                self.forwarder.enqueue(to_xml(event))
            except Exception:
                LOG.exception("cannot queue an audit message for forwarding")
        if wait:
            try:
                self.trail.wait_durable(seq)
            except AuditTrailError as exc:
                raise RecordNotDurable(f"the audit trail cannot be written now: {exc}",
                                       held=True) from exc

    def health(self) -> tuple[bool, str]:
        """Whether the trail can be written now (``/readyz``; the doors ask it per instance)."""
        return self.trail.health()

    def close(self) -> None:
        try:
            self.trail.close()
        except Exception:
            LOG.exception("the audit trail did not close cleanly")
        finally:
            if self.forwarder is not None:
                self.forwarder.stop()
