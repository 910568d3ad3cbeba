"""What the receive path reads and writes of a dataset, without decoding it.

* ``read_header``: the few attributes ingest needs (SOP Instance, Study and Series
  Instance UIDs, Number of Study Related Instances) and those QIDO-RS answers from the
  index (:class:`~dicomnode.core.attributes.InstanceAttributes`: patient, study and
  series attributes, Instance Number, Rows, Columns, Number of Frames), found by
  walking the top-level element headers of the encoded dataset with the one element
  walker (:mod:`dicomnode.core.elements`, PS3.5 7.1) and stopping after (0028,0011)
  Columns, before any pixel data; about 15-40 us for a CT slice. Sequences are skipped,
  never parsed. Deflated datasets, and anything the walk does not understand, go
  through pydicom's partial reader instead. Text is decoded with the data set's
  Specific Character Set (PS3.5 6.1.2.3) when it is not plain ASCII.
* ``encode_file_meta``: the 128-byte preamble, "DICM" and the File Meta
  Information group (PS3.10 7.1), built directly as Explicit VR Little Endian.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.core.attributes import InstanceAttributes, date_key, to_int
from dicomnode.core.elements import WalkError, walk
from dicomnode.errors import InvalidInstanceError

_CHARSET = 0x00080005
_SOP_INSTANCE_UID = 0x00080018
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_STUDY_RELATED_INSTANCES = 0x00201208
_ROWS = 0x00280010
_COLUMNS = 0x00280011
#: InstanceAttributes field -> (tag, how its value is read)
_QIDO: dict[str, tuple[int, str]] = {
    "study_date": (0x00080020, "date"), "study_time": (0x00080030, "text"),
    "accession_number": (0x00080050, "text"), "modality": (0x00080060, "text"),
    "referring_physician_name": (0x00080090, "text"),
    "study_description": (0x00081030, "text"), "series_description": (0x0008103E, "text"),
    "patient_name": (_PATIENT_NAME, "text"), "patient_id": (_PATIENT_ID, "text"),
    "patient_birth_date": (0x00100030, "date"), "patient_sex": (0x00100040, "text"),
    "study_id": (0x00200010, "text"), "series_number": (0x00200011, "int"),
    "instance_number": (0x00200013, "int"), "number_of_frames": (0x00280008, "int"),
    "rows": (_ROWS, "us"), "columns": (_COLUMNS, "us"),
}
_WANTED = frozenset((_CHARSET, _SOP_INSTANCE_UID, _STUDY_UID, _SERIES_UID,
                     _STUDY_RELATED_INSTANCES, *(t for t, _ in _QIDO.values())))
_LAST = _COLUMNS
_DEFLATE_HEADER_LIMIT = 16 << 20


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The attributes the receive path needs."""

    sop_instance_uid: str | None
    study_uid: str
    series_uid: str
    expected_count: int | None
    # patient identifiers: only ever written into encrypted audit records and the index
    # (for QIDO-RS), never logged
    patient_id: str = ""
    patient_name: str = ""
    attributes: InstanceAttributes | None = None


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
            value = elem.value
            if isinstance(value, list | MultiValue):  # e.g. several character sets
                value = "\\".join(str(v) for v in value)
            out[t] = str(value)
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
    values: Mapping[int, bytes | str] | None = None
    if ts != DeflatedExplicitVRLittleEndian:
        try:
            values = _scan(memoryview(data), ts == ImplicitVRLittleEndian,
                           ts != ExplicitVRBigEndian)
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
    attrs = _attributes(values, ts != ExplicitVRBigEndian)
    return HeaderInfo(
        _text(values.get(_SOP_INSTANCE_UID)),
        study,
        series,
        count if count and count > 0 else None,
        attrs.patient_id,
        attrs.patient_name,
        attrs,
    )


_TEXT, _INT, _DATE, _US = range(4)
_HOW = {"text": _TEXT, "int": _INT, "date": _DATE, "us": _US}
#: (tag, how it is read) in the order of InstanceAttributes' fields
_FIELDS = tuple((_QIDO[name][0], _HOW[_QIDO[name][1]]) for name in InstanceAttributes._fields)
_PERSON = frozenset((_PATIENT_NAME, 0x00080090))


def _attributes(values: Mapping[int, bytes | str], little: bool) -> InstanceAttributes:
    """The QIDO-RS attributes from the raw values found (PS3.5 6.2 value encodings)."""
    charset: str | None = None
    out: list[str | int | None] = []
    for tag, how in _FIELDS:
        raw = values.get(tag)
        if raw is None:
            out.append(None if how == _INT or how == _US else "")
            continue
        if how == _US and not isinstance(raw, str) and len(raw) == 2:  # binary US
            out.append(int.from_bytes(raw, "little" if little else "big"))
            continue
        if isinstance(raw, str):
            text = raw
        elif raw.isascii() and b"\x1b" not in raw:  # no ISO 2022 escape: plain ASCII
            text = raw.decode("ascii")
        else:
            if charset is None:
                charset = _text(values.get(_CHARSET)) or ""
            text = _decode_charset(raw, charset, tag in _PERSON)
        text = text.rstrip("\x00 ").strip()
        if how == _TEXT:
            out.append(text)
        elif how == _US:  # not 2 bytes: a US written as text, or broken
            out.append(to_int(text) if text.isdigit() else None)
        elif how == _DATE:
            out.append(text if len(text) == 8 and text.isdigit() else date_key(text))
        else:
            out.append(to_int(text))
    return InstanceAttributes._make(out)


def _decode_charset(value: bytes, charset: str, person: bool) -> str:
    """Text outside ASCII, decoded with the Specific Character Set (PS3.5 6.1.2.3; ISO
    2022 escapes included), leniently."""
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.valuerep import PersonName

    try:
        encodings = convert_encodings(charset.split("\\") if charset else ["ISO_IR 6"])
        if person:
            return str(PersonName(value, encodings))
        return str(decode_bytes(value, encodings, {0x5C}))
    except Exception:  # an unknown or broken character set: never refuse the instance
        return value.decode("utf-8", errors="replace")


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
