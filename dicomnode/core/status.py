"""The one table of DIMSE and DICOMweb statuses, and the one mapping from the node's
exceptions to them.

Both front doors (C-STORE, PS3.4 Annex B; STOW-RS, PS3.18 10.5) and both senders
(C-STORE SCU, STOW-RS client) speak the same status codes: STOW-RS reports the
C-STORE status of each failed instance as its Failure Reason (PS3.18 Table 10.5.3-1).
So the codes live here once, with :func:`status_for` (an exception raised below the
edge -> the status a door answers), :func:`classify_status` (a peer's status -> ok,
try again later, or give up) and :func:`describe_status` (a status in words, for logs
and the outbox).
"""

from __future__ import annotations

import enum

from dicomnode.errors import (
    InvalidInstanceError,
    InvalidUIDError,
    NotAuthorizedError,
    StorageError,
    StorageUnavailableError,
)

__all__ = [
    "Result",
    "Status",
    "WARNINGS",
    "classify_status",
    "describe_status",
    "http_status_of_store",
    "is_success",
    "status_for",
]


class Status(enum.IntEnum):
    """C-STORE (and C-ECHO) statuses the node answers or meets (PS3.4 Table B.2-1, PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    CANCEL = 0xFE00
    # warnings: the instance is stored
    COERCION = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_MISMATCH_WARNING = 0xB007


#: Warning statuses outside 0xBxxx (PS3.7 Annex C): the instance is stored.
WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
#: Failures that say "not now" rather than "never" (PS3.7 C.5): processing failure,
#: duplicate invocation, resource limitation, and a cancelled operation.
_TRANSIENT_FAILURES = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})


class Result(enum.StrEnum):
    """What a peer's status means for one instance sent to it."""

    OK = "ok"
    """The peer has the instance (stored, stored with a warning, or already had it)."""
    TRANSIENT = "transient"
    """Not delivered, but it may work later: the peer is down, busy or out of resources."""
    PERMANENT = "permanent"
    """Not delivered, and sending the same bytes again will not help."""


def status_for(exc: BaseException) -> Status:
    """The status a front door answers for ``exc`` raised while admitting an instance.

    * the data cannot be understood (a malformed data set, an invalid UID): 0xC000;
    * it could not be stored durably, or the node refuses new work until storage or
      the audit trail is back: 0xA700 (the sender retries later);
    * the caller may not store it: 0x0124;
    * anything else is a bug, reported as 0x0110 Processing Failure.
    """
    if isinstance(exc, InvalidInstanceError | InvalidUIDError):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, StorageError | StorageUnavailableError):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, NotAuthorizedError):
        return Status.NOT_AUTHORIZED
    return Status.PROCESSING_FAILURE


def is_success(status: int) -> bool:
    """Success or a warning: the peer (or the node) holds the instance."""
    code = int(status)
    return code == 0x0000 or code in WARNINGS or (code & 0xF000) == 0xB000


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
    if is_success(code) or code == Status.DUPLICATE_SOP_INSTANCE:
        return Result.OK
    if (code & 0xFF00) == 0xA700 or code in _TRANSIENT_FAILURES:
        return Result.TRANSIENT
    return Result.PERMANENT


def describe_status(status: int) -> str:
    """``status 0xA700 (out of resources)``: the code in hex and its class in words."""
    code = int(status)
    if code == 0x0000:
        words = "success"
    elif code in WARNINGS or (code & 0xF000) == 0xB000:
        words = "warning"
    elif code == Status.DUPLICATE_SOP_INSTANCE:
        words = "duplicate SOP instance"
    elif (code & 0xFF00) == 0xA700:
        words = "out of resources"
    elif (code & 0xFF00) == 0xA900:
        words = "data set does not match SOP class"
    elif (code & 0xF000) == 0xC000:
        words = "cannot understand"
    elif code == Status.PROCESSING_FAILURE:
        words = "processing failure"
    elif code == Status.SOP_CLASS_NOT_SUPPORTED:
        words = "SOP class not supported"
    elif code == Status.NOT_AUTHORIZED:
        words = "not authorized"
    elif code == Status.CANCEL:
        words = "cancelled"
    else:
        words = "failure"
    return f"status 0x{code:04X} ({words})"


def http_status_of_store(stored: int, failed: int) -> int:
    """The HTTP status of a STOW-RS response (PS3.18 10.5.3): 200 when every instance
    was stored, 202 when some were, 409 when none was."""
    if not failed:
        return 200
    return 202 if stored else 409
