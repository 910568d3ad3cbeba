"""One walker over encoded DICOM data elements (PS3.5 7.1, 7.5), used by every fast reader.

The receive path (:mod:`dicomnode.ingest.header`) and the volume loader
(:mod:`dicomnode.inference.volume`) both need a few top-level attributes of an encoded
data set without parsing it: :func:`walk` visits the top-level elements from a
position, copies the raw values of the tags asked for, skips sequences item by item,
and stops at the first element whose tag is at or after ``stop_at`` (whose header
:func:`element_header` reads).

Encoding rules it follows:

* Implicit VR Little Endian, Explicit VR Little and Big Endian (PS3.5 7.1.1-7.1.3);
  the 4-byte length of OB, OD, OF, OL, OV, OW, SQ, SV, UC, UN, UR, UT and UV;
* items and delimiters (group FFFE) carry no VR in any encoding (PS3.5 7.5);
* undefined-length sequences and items end with their delimitation items, nested to
  at most :data:`MAX_DEPTH` levels;
* an undefined-length UN element holds a sequence encoded in Implicit VR Little
  Endian whatever the transfer syntax (PS3.5 6.2.2).

Anything it cannot follow (a VR that is not two letters, a value running past the end
of the data, a missing item tag, nesting too deep) raises :class:`WalkError`: the
caller then hands the data to pydicom, which is slower but reads everything.
"""

from __future__ import annotations

import struct
from collections.abc import Container, MutableMapping

__all__ = ["MAX_DEPTH", "UNDEFINED", "WalkError", "element_header", "walk"]

#: the Value Length of undefined-length sequences, items and encapsulated pixel data
UNDEFINED = 0xFFFFFFFF
#: deepest nesting of undefined-length sequences followed
MAX_DEPTH = 64

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM = 0xE000
_ITEM_END = 0xE00D
_SEQUENCE_END = 0xE0DD

_STRUCTS = {
    little: (struct.Struct(f"{e}HHI"), struct.Struct(f"{e}HH2sH"), struct.Struct(f"{e}I"))
    for little, e in ((True, "<"), (False, ">"))
}


class WalkError(Exception):
    """The walker cannot follow the data safely; read it with pydicom instead."""


Buffer = bytes | bytearray | memoryview


def element_header(data: Buffer, pos: int, *, implicit: bool,
                   little: bool = True) -> tuple[int, int, int]:
    """``(tag, value position, value length)`` of the element whose header starts at
    ``pos``. Raises :class:`WalkError` for an explicit VR that is not two letters or a
    header cut short."""
    implicit_hdr, explicit_hdr, u32 = _STRUCTS[little]
    try:
        if implicit:
            group, elem, length = implicit_hdr.unpack_from(data, pos)
            return (group << 16) | elem, pos + 8, length
        group, elem, vr, length = explicit_hdr.unpack_from(data, pos)
        if group == 0xFFFE:  # items and delimiters carry no VR in any encoding
            group, elem, length = implicit_hdr.unpack_from(data, pos)
            return (group << 16) | elem, pos + 8, length
        if vr in _LONG_VRS:
            return (group << 16) | elem, pos + 12, u32.unpack_from(data, pos + 8)[0]
        if not vr.isalpha():
            raise WalkError(f"({group:04X},{elem:04X}) has no valid explicit VR")
        return (group << 16) | elem, pos + 8, length
    except struct.error as exc:
        raise WalkError(f"an element header is cut short: {exc}") from None


def walk(
    data: Buffer,
    pos: int,
    *,
    implicit: bool,
    little: bool = True,
    wanted: Container[int] = (),
    found: MutableMapping[int, bytes] | None = None,
    stop_at: int = 0xFFFFFFFF,
) -> tuple[int, int]:
    """Walk the top-level data elements of ``data`` from ``pos``.

    The raw value of each top-level element whose tag is in ``wanted`` is copied into
    ``found`` (an undefined-length element, i.e. a sequence, is recorded as present with
    an empty value). The walk stops at the first element whose tag is ``>= stop_at``
    and returns ``(tag, position of its header)``, without reading further (read it
    with :func:`element_header`); at the end of the data it returns ``(-1, len(data))``.

    Raises :class:`WalkError` when the data cannot be followed; a header cut short is
    a :class:`WalkError` too.
    """
    implicit_hdr, explicit_hdr, u32 = _STRUCTS[little]
    unpack_implicit, unpack_explicit, unpack_u32 = (
        implicit_hdr.unpack_from, explicit_hdr.unpack_from, u32.unpack_from
    )
    end = len(data)
    try:
        while pos + 8 <= end:
            if implicit:
                group, elem, length = unpack_implicit(data, pos)
                tag = (group << 16) | elem
                if tag >= stop_at:
                    return tag, pos
                vpos, vr = pos + 8, b""
            else:
                group, elem, vr, length = unpack_explicit(data, pos)
                tag = (group << 16) | elem
                if tag >= stop_at:
                    return tag, pos
                if vr in _LONG_VRS:
                    length = unpack_u32(data, pos + 8)[0]
                    vpos = pos + 12
                elif vr.isalpha():
                    vpos = pos + 8
                else:
                    raise WalkError(f"({group:04X},{elem:04X}) has no valid explicit VR")
            if length == UNDEFINED:
                if found is not None and tag in wanted:
                    found[tag] = b""
                pos = _skip_items(data, vpos, implicit or vr == b"UN", little, 1)
                continue
            if vpos + length > end:
                raise WalkError(f"({group:04X},{elem:04X}) runs past the end of the data")
            if found is not None and tag in wanted:
                found[tag] = bytes(data[vpos : vpos + length])
            pos = vpos + length
    except struct.error as exc:
        raise WalkError(f"an element header is cut short: {exc}") from None
    return -1, end


def _skip_items(data: Buffer, pos: int, implicit: bool, little: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence whose first item starts at
    ``pos``; returns the position after its Sequence Delimitation Item."""
    if depth > MAX_DEPTH:
        raise WalkError("sequences nested too deeply")
    unpack_item = _STRUCTS[little][0].unpack_from
    end = len(data)
    while pos + 8 <= end:
        group, elem, length = unpack_item(data, pos)
        pos += 8
        if group != 0xFFFE:
            raise WalkError("expected an item tag in a sequence")
        if elem == _SEQUENCE_END:
            return pos
        if elem != _ITEM:
            raise WalkError("unexpected delimiter in a sequence")
        if length == UNDEFINED:
            pos = _skip_item(data, pos, implicit, little, depth)
        else:
            pos += length
            if pos > end:
                raise WalkError("an item runs past the end of the data")
    raise WalkError("a sequence runs past the end of the data")


def _skip_item(data: Buffer, pos: int, implicit: bool, little: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item; returns the position after its
    Item Delimitation Item."""
    unpack_tag = _STRUCTS[little][0].unpack_from
    end = len(data)
    while pos + 8 <= end:
        group, elem, _ = unpack_tag(data, pos)
        if group == 0xFFFE:
            if elem == _ITEM_END:
                return pos + 8
            raise WalkError("unexpected item tag inside an item")
        tag, vpos, length = element_header(data, pos, implicit=implicit, little=little)
        if length == UNDEFINED:
            un = not implicit and bytes(data[pos + 4 : pos + 6]) == b"UN"
            pos = _skip_items(data, vpos, implicit or un, little, depth + 1)
        else:
            pos = vpos + length
            if pos > end:
                raise WalkError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end"
                                " of the data")
    raise WalkError("an item runs past the end of the data")
