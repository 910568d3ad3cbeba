"""The one rule for DICOM UIDs (PS3.5 9.1), in a strict and a tolerant mode.

A UID is at most 64 characters of digits and dots, made of components separated by
single dots. PS3.5 9.1 also forbids leading zeros in a component ("0" alone is
allowed): the **strict** mode enforces that, for UIDs the node writes or that an
operator types into the config. Real modalities do send components with leading
zeros, so the **tolerant** mode, for UIDs received from peers, accepts them: it still
refuses anything that could not safely become a file name (no other characters, no
empty component, nothing longer than 64 characters).
"""

from __future__ import annotations

import re

from dicomnode.errors import InvalidUIDError

__all__ = ["MAX_UID_LENGTH", "check_uid", "is_uid"]

MAX_UID_LENGTH = 64
_TOLERANT = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STRICT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def check_uid(uid: object, what: str = "UID", *, strict: bool = False) -> str:
    """Return ``uid`` (trailing NUL/space padding removed) if it is a valid UID, else
    raise :class:`~dicomnode.errors.InvalidUIDError` naming ``what`` and the problem."""
    if not isinstance(uid, str):
        raise InvalidUIDError(f"{what} is missing")
    uid = uid.rstrip("\x00 ")
    if not uid:
        raise InvalidUIDError(f"{what} is empty")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidUIDError(
            f"{what} is {len(uid)} characters long (at most {MAX_UID_LENGTH})")
    if not _TOLERANT.match(uid):
        raise InvalidUIDError(f"{what} contains characters other than digits and dots")
    if strict and not _STRICT.match(uid):
        raise InvalidUIDError(f"{what} {uid!r} has a component with a leading zero")
    return uid


def is_uid(uid: object, *, strict: bool = False) -> bool:
    """Whether ``uid`` passes :func:`check_uid`."""
    try:
        check_uid(uid, strict=strict)
    except InvalidUIDError:
        return False
    return True
