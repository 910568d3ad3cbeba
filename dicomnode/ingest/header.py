"""What the receive path reads and writes of a dataset, without decoding it.

* ``read_header``: the few attributes ingest needs (SOP Instance, Study and Series
  Instance UIDs, Number of Study Related Instances), found by walking the
  top-level element headers of the encoded dataset (PS3.5 7.1) and stopping after
  (0020,1208); about 20 us for a CT slice. Sequences are skipped, never parsed.
  Deflated and big-endian datasets, and anything the walk does not understand,
  go through pydicom's partial reader instead.
* ``encode_file_meta``: the 128-byte preamble, "DICM" and the File Meta
  Information group (PS3.10 7.1), built directly as Explicit VR Little Endian.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.errors import InvalidInstanceError

_SOP_INSTANCE_UID = 0x00080018
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_STUDY_RELATED_INSTANCES = 0x00201208
_WANTED = (_SOP_INSTANCE_UID, _PATIENT_NAME, _PATIENT_ID, _STUDY_UID, _SERIES_UID,
           _STUDY_RELATED_INSTANCES)
_LAST = _STUDY_RELATED_INSTANCES
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_DEFLATE_HEADER_LIMIT = 16 << 20
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The attributes the receive path needs."""

    sop_instance_uid: str | None
    study_uid: str
    series_uid: str
    expected_count: int | None
    # patient identifiers: only ever written into encrypted audit records, never logged
    patient_id: str = ""
    patient_name: str = ""


class _ScanError(Exception):
    pass


def _element(buf: memoryview, pos: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, value position, value length) of the element at ``pos``."""
    grp, elem = struct.unpack_from("<HH", buf, pos)
    tag = (grp << 16) | elem
    if implicit or grp == 0xFFFE:
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        return tag, pos + 8, length
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<L", buf, pos + 8)
        return tag, pos + 12, length
    if not vr.isalpha():
        raise _ScanError("not an explicit VR")
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return tag, pos + 8, length


def _skip_undefined(buf: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence; return the position after it."""
    if depth > _MAX_DEPTH:
        raise _ScanError("sequences nested too deeply")
    n = len(buf)
    while pos + 8 <= n:
        grp, elem, length = struct.unpack_from("<HHL", buf, pos)
        pos += 8
        if grp != 0xFFFE:
            raise _ScanError("expected an item tag")
        if elem == 0xE0DD:  # sequence delimitation item
            return pos
        if elem != 0xE000:
            raise _ScanError("unexpected delimiter")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # undefined-length item: walk to its delimitation item
            if pos + 8 > n:
                raise _ScanError("truncated")
            grp, elem = struct.unpack_from("<HH", buf, pos)
            if grp == 0xFFFE and elem == 0xE00D:
                pos += 8
                break
            _, vpos, vlen = _element(buf, pos, implicit)
            pos = _skip_undefined(buf, vpos, implicit, depth + 1) if vlen == _UNDEFINED else vpos + vlen
    raise _ScanError("truncated")


def _scan(buf: memoryview, implicit: bool) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos, n = 0, len(buf)
    while pos + 8 <= n:
        tag, vpos, length = _element(buf, pos, implicit)
        if tag > _LAST:
            break
        if length == _UNDEFINED:
            pos = _skip_undefined(buf, vpos, implicit, 1)
            continue
        if vpos + length > n:
            raise _ScanError("truncated")
        if tag in _WANTED:
            found[tag] = bytes(buf[vpos : vpos + length])
        pos = vpos + length
    return found


def _pydicom(data: bytes | memoryview, ts: UID) -> dict[int, bytes | str]:
    raw: bytes | memoryview = data
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _DEFLATE_HEADER_LIMIT)
        except zlib.error as exc:
            raise InvalidInstanceError(f"deflated dataset cannot be inflated: {exc}") from None
    known = ts.is_transfer_syntax
    ds = read_dataset(
        io.BytesIO(raw),
        ts.is_implicit_VR if known else False,
        ts.is_little_endian if known else True,
        stop_when=lambda tag, vr, length: tag > _LAST,
        specific_tags=[Tag(t) for t in _WANTED],
    )
    out: dict[int, bytes | str] = {}
    for t in _WANTED:
        elem = ds.get(Tag(t))
        if elem is not None and elem.value not in (None, ""):
            out[t] = str(elem.value)
    return out


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    value = value.rstrip("\x00 ").strip()
    return value or None


def read_header(data: bytes | memoryview, transfer_syntax: str) -> HeaderInfo:
    """Read the receive path's attributes from an encoded dataset (no file meta).

    Raises InvalidInstanceError with a reason when they cannot be read.
    """
    ts = UID(transfer_syntax)
    values: dict[int, bytes | str] | None = None
    if ts not in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        try:
            values = dict(_scan(memoryview(data), ts == ImplicitVRLittleEndian))
        except (_ScanError, struct.error):
            values = None
    if values is None:
        try:
            values = _pydicom(data, ts)
        except InvalidInstanceError:
            raise
        except RecursionError:
            raise InvalidInstanceError("dataset nests sequences too deeply to be read") from None
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InvalidInstanceError(f"dataset header cannot be parsed: {exc}") from None
    study = _text(values.get(_STUDY_UID))
    series = _text(values.get(_SERIES_UID))
    if study is None:
        raise InvalidInstanceError("Study Instance UID (0020,000D) is missing")
    if series is None:
        raise InvalidInstanceError("Series Instance UID (0020,000E) is missing")
    count_text = _text(values.get(_STUDY_RELATED_INSTANCES))
    try:
        count = int(count_text) if count_text else None
    except ValueError:
        count = None
    return HeaderInfo(
        _text(values.get(_SOP_INSTANCE_UID)),
        study,
        series,
        count if count and count > 0 else None,
        _person(values.get(_PATIENT_ID)),
        _person(values.get(_PATIENT_NAME)),
    )


def _person(value: bytes | str | None) -> str:
    """Patient ID/Name as text; bytes outside ASCII are decoded leniently (the
    Specific Character Set is not read on this path)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.rstrip("\x00 ").strip()


def _ui(elem: int, value: str) -> bytes:
    v = value.encode("ascii")
    if len(v) % 2:
        v += b"\0"
    return struct.pack("<HH2sH", 2, elem, b"UI", len(v)) + v


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version: str,
    source_ae: str = "",
) -> bytes:
    """Preamble + "DICM" + the (0002,eeee) File Meta Information group (PS3.10 7.1)."""
    body = b"".join(
        (
            struct.pack("<HH2sHLH", 2, 1, b"OB", 0, 2, 0x0100),  # version 00\01
            _ui(0x0002, sop_class_uid),
            _ui(0x0003, sop_instance_uid),
            _ui(0x0010, transfer_syntax),
            _ui(0x0012, implementation_class_uid),
        )
    )
    for elem, vr, text in ((0x0013, b"SH", implementation_version), (0x0016, b"AE", source_ae)):
        v = text.strip().encode("ascii", errors="replace")
        if v:
            if len(v) % 2:
                v += b" "
            body += struct.pack("<HH2sH", 2, elem, vr, len(v)) + v
    group_length = struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body
