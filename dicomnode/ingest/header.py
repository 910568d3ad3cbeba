"""What the receive path reads and writes of a dataset, without decoding it.

* ``read_header``: the few attributes ingest needs (SOP Instance, Study and Series
  Instance UIDs, Number of Study Related Instances), found by walking the
  top-level element headers of the encoded dataset with the one element walker
  (:mod:`dicomnode.core.elements`, PS3.5 7.1) and stopping after (0020,1208); about
  20 us for a CT slice. Sequences are skipped, never parsed. Deflated datasets, and
  anything the walk does not understand, go through pydicom's partial reader instead.
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

from dicomnode.core.elements import WalkError, walk
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
_DEFLATE_HEADER_LIMIT = 16 << 20


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


def _scan(buf: memoryview, implicit: bool, little: bool) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    walk(buf, 0, implicit=implicit, little=little, wanted=_WANTED, found=found,
         stop_at=_LAST + 1)
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
    if ts != DeflatedExplicitVRLittleEndian:
        try:
            values = dict(_scan(memoryview(data), ts == ImplicitVRLittleEndian,
                                ts != ExplicitVRBigEndian))
        except WalkError:
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
