"""The sender contract: deliver result files to one destination, one outcome per file.

A :class:`Sender` is the extension point behind the outbox (ARCHITECTURE.md, house
style 5): ``dimse.py`` (C-STORE SCU, PS3.4 Annex B) and ``stowrs.py`` (STOW-RS, PS3.18
10.5) implement it, and ``tests/test_export.py`` holds the one contract test run over
both. The outbox decides what to do with each :class:`DeliveryOutcome`: an ``ok``
delivery is done, a ``transient`` one is retried with backoff, a ``permanent`` one is
set aside as failed until an operator retries it.

Status codes mean the same thing for both protocols (STOW-RS reports the C-STORE
status of each failed instance as its Failure Reason, PS3.18 Table 10.5.3-1), so one
function classifies them: :func:`classify_status`.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config is at the bottom of the dependency graph; only for typing
    from dicomnode.config import Destination

LOG = logging.getLogger(__name__)


class Result(enum.StrEnum):
    """What happened to one file sent to one destination."""

    OK = "ok"
    """The peer has the instance (stored, stored with a warning, or already had it)."""
    TRANSIENT = "transient"
    """Not delivered, but it may work later: the peer is down, busy or out of resources."""
    PERMANENT = "permanent"
    """Not delivered, and sending the same bytes again will not help."""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """The outcome of sending one file: ``result``, a human-readable ``reason`` when it
    was not plainly stored, and the protocol's ``status`` (C-STORE status or Failure
    Reason, or the HTTP status where no per-instance status was given)."""

    path: Path
    result: Result
    reason: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.result is Result.OK

    @classmethod
    def success(cls, path: Path, status: int | None = 0) -> DeliveryOutcome:
        return cls(Path(path), Result.OK, None, status)

    @classmethod
    def transient(cls, path: Path, reason: str, status: int | None = None) -> DeliveryOutcome:
        return cls(Path(path), Result.TRANSIENT, reason, status)

    @classmethod
    def permanent(cls, path: Path, reason: str, status: int | None = None) -> DeliveryOutcome:
        return cls(Path(path), Result.PERMANENT, reason, status)


StatusClassifier = Callable[[int], Result]

# Warning statuses of C-STORE (PS3.4 Table B.2-1; PS3.7 Annex C): the instance is stored.
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
# Failures that say "not now" rather than "never" (PS3.7 C.5): processing failure,
# duplicate invocation, resource limitation, and a cancelled operation.
_TRANSIENT_FAILURES = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})
DUPLICATE_SOP_INSTANCE = 0x0111


def classify_status(status: int) -> Result:
    """Classify a C-STORE status (or STOW-RS Failure Reason) as ok / transient / permanent.

    * ``0x0000`` Success, ``0xB000``-``0xBFFF`` and ``0x0001``/``0x0107``/``0x0116``
      Warnings (coercion, elements discarded, data set does not match SOP class): ok.
    * ``0x0111`` Duplicate SOP Instance: ok -- the peer already has this instance, and
      result UIDs are deterministic, so it is ours.
    * ``0xA700``-``0xA7FF`` Refused: Out of Resources, ``0x0110`` Processing failure,
      ``0x0210``/``0x0213`` (duplicate invocation, resource limitation), ``0xFE00``
      Cancel: transient.
    * ``0xA900``-``0xA9FF`` Data Set does not match SOP Class, ``0xC000``-``0xCFFF``
      Cannot understand, and every other failure (``0x0122`` SOP class not supported,
      ``0x0124`` not authorized, ...): permanent.

    Some PACS answer ``0xC0xx`` for what is really a passing problem (a database lock,
    a full disk behind a generic error handler). Where a site knows its PACS does, give
    its sender another classifier (``make_sender(..., classify=...)``) or retry the
    failed deliveries from the outbox once the PACS is fixed.
    """
    code = int(status)
    if code == 0x0000 or code in _WARNINGS or (code & 0xF000) == 0xB000:
        return Result.OK
    if code == DUPLICATE_SOP_INSTANCE:
        return Result.OK
    if (code & 0xFF00) == 0xA700 or code in _TRANSIENT_FAILURES:
        return Result.TRANSIENT
    return Result.PERMANENT


def describe_status(status: int) -> str:
    """``status 0xA700 (out of resources)``: the code in hex and its class in words."""
    code = int(status)
    if code == 0x0000:
        words = "success"
    elif code in _WARNINGS or (code & 0xF000) == 0xB000:
        words = "warning"
    elif code == DUPLICATE_SOP_INSTANCE:
        words = "duplicate SOP instance"
    elif (code & 0xFF00) == 0xA700:
        words = "out of resources"
    elif (code & 0xFF00) == 0xA900:
        words = "data set does not match SOP class"
    elif (code & 0xF000) == 0xC000:
        words = "cannot understand"
    elif code == 0x0110:
        words = "processing failure"
    elif code == 0x0122:
        words = "SOP class not supported"
    elif code == 0x0124:
        words = "not authorized"
    elif code == 0xFE00:
        words = "cancelled"
    else:
        words = "failure"
    return f"status 0x{code:04X} ({words})"


class Sender(abc.ABC):
    """Delivers files to one destination.

    The contract every implementation keeps (tests/test_export.py checks it):

    * :meth:`send` returns exactly one :class:`DeliveryOutcome` per input path, in the
      order given, and does not raise for anything that concerns a file or the peer
      (an unreadable file is ``permanent``; an unreachable peer makes every file
      ``transient``). An exception out of :meth:`send` is a bug; the outbox then counts
      the whole batch as a transient failure.
    * Files are sent as they are on disk where the protocol allows (no re-encoding in
      DIMSE; STOW-RS posts each file's data set in its own transfer syntax).
    * :meth:`close` releases whatever the sender holds (sessions, associations); a
      closed sender may be used again (it reconnects).
    """

    #: A short label for logs: ``dimse ORTHANC@127.0.0.1:4242`` or the STOW-RS URL.
    label: str = "sender"

    @abc.abstractmethod
    def send(self, files: list[Path]) -> list[DeliveryOutcome]:
        """Send ``files``; one outcome per file, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and sessions."""

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def make_sender(destination: Destination, calling_ae: str, **options: Any) -> Sender:
    """The :class:`Sender` for a configured destination (``protocol`` dimse or stowrs).

    ``calling_ae`` is the node's AE title (used by DIMSE). ``options`` go to the
    implementation: ``timeout`` (seconds, both), ``classify`` (a
    :data:`StatusClassifier`, both), ``acse_timeout`` / ``dimse_timeout`` /
    ``network_timeout`` (DIMSE), ``headers`` / ``session`` (STOW-RS).
    """
    if destination.deidentify:
        # never send identifiable data to an off-site destination by mistake: only
        # dicomnode.export.deidentify.deidentifying_sender_factory may build its sender
        raise ValueError(f"destination {destination.name} is marked deidentify: its sender"
                         " comes from dicomnode.export.deidentify.deidentifying_sender_factory")
    if destination.protocol == "dimse":
        from dicomnode.export.dimse import DimseStoreSender, Peer

        assert destination.ae_title and destination.host and destination.port  # validated
        peer = Peer(destination.ae_title, destination.host, destination.port)
        return DimseStoreSender(peer, calling_ae, tls=destination.tls, **options)
    if destination.protocol == "stowrs":
        from dicomnode.export.stowrs import StowRsSender

        assert destination.url  # validated by config
        return StowRsSender(destination.url, **options)
    raise ValueError(f"destination {destination.name}: unknown protocol {destination.protocol!r}")
