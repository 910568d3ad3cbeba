"""What every part of the configuration is built from: the frozen model base and the
validated value types (AE titles, UIDs, ports)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dicomnode.core.uids import is_uid

SENDER = "@sender"  # in a rule's destinations: the calling AE's own return address


def _check_ae_title(value: str) -> str:
    """AE titles: 1-16 characters of the default repertoire, no backslash or control
    characters, not all spaces (PS3.5 6.2, VR AE). Leading/trailing spaces are not
    significant and are removed."""
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"is {len(stripped)} characters long, at most 16 are allowed")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in stripped):
        raise ValueError("may contain only printable ASCII characters other than backslash")
    return stripped


def _check_uid(value: str) -> str:
    if not is_uid(value, strict=True):
        raise ValueError(f"{value!r} is not a valid DICOM UID")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
UIDStr = Annotated[str, AfterValidator(_check_uid)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
