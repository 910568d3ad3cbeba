"""One exception hierarchy for the whole node.

Errors are turned into a DICOM or HTTP status at the network edge, in one place;
everything below raises one of these.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The service configuration is missing, unreadable or invalid.

    ``problems`` lists ``(field, message)`` pairs, the field as a dotted path.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"invalid configuration in {source}:"]
        lines += [f"  {field}: {message}" for field, message in problems]
        super().__init__("\n".join(lines))


class InvalidUIDError(DicomNodeError, ValueError):
    """A UID is not a syntactically valid DICOM UID (PS3.5 9.1)."""


class StorageError(DicomNodeError):
    """An instance could not be written durably (disk full, I/O error)."""


class StorageUnavailableError(DicomNodeError):
    """The node refuses new work for now: storage or the audit trail cannot be written.
    Senders get 0xA700 (C-STORE) or 503 (HTTP) and retry later."""


class NotAuthorizedError(DicomNodeError):
    """The caller may not do this (e.g. store this SOP class)."""


class InvalidInstanceError(DicomNodeError):
    """A received instance cannot be understood (missing or malformed attributes)."""


class DestinationError(DicomNodeError):
    """A destination string or peer could not be parsed or reached."""


class InconsistentSeriesError(DicomNodeError):
    """A set of instances does not form one regular volume (PS3.3 C.7.6.2).

    ``reasons`` lists every human-readable reason found (mixed series, orientation
    or size, missing or duplicated positions, a missing slice, uneven spacing,
    gantry tilt, ...), so that one refusal tells the whole story.
    """

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        lines = ["the instances do not form one volume:"]
        lines += [f"  {reason}" for reason in self.reasons]
        super().__init__("\n".join(lines))
