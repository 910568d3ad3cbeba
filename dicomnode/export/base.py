"""The sender contract: deliver result files to one destination, one outcome per file.

A :class:`Sender` is the extension point behind the outbox (ARCHITECTURE.md, house
style 5): ``dimse.py`` (C-STORE SCU, PS3.4 Annex B) and ``stowrs.py`` (STOW-RS, PS3.18
10.5) implement it, and ``tests/test_export.py`` holds the one contract test run over
both. The outbox decides what to do with each :class:`DeliveryOutcome`: an ``ok``
delivery is done, a ``transient`` one is retried with backoff, a ``permanent`` one is
set aside as failed until an operator retries it.

Status codes mean the same thing for both protocols (STOW-RS reports the C-STORE
status of each failed instance as its Failure Reason, PS3.18 Table 10.5.3-1), so one
function classifies them: :func:`~dicomnode.core.status.classify_status`, from the
node's one status table. :func:`dicomnode.export.senders.make_sender` picks the
implementation for a configured destination.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.core.status import Result, Status, classify_status, describe_status

__all__ = ["DUPLICATE_SOP_INSTANCE", "DeliveryOutcome", "Result", "Sender", "StatusClassifier",
           "classify_status", "describe_status"]

LOG = logging.getLogger(__name__)


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
DUPLICATE_SOP_INSTANCE = int(Status.DUPLICATE_SOP_INSTANCE)


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
