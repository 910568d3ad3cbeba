"""The one DICOM element walker (dicomnode/core/elements.py), used by the receive path's
header scan and the volume loader: the encodings of PS3.5 7.1 and 7.5, and the case the
two old walkers disagreed on, a UN element of undefined length inside a sequence."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.core.elements import MAX_DEPTH, WalkError, element_header, walk
from dicomnode.ingest.header import read_header

STUDY, SERIES, SOP = 0x0020000D, 0x0020000E, 0x00080018


def _explicit(tag: int, vr: bytes, value: bytes, little: bool = True) -> bytes:
    e = "<" if little else ">"
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack(f"{e}HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack(f"{e}HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _undefined(tag: int, vr: bytes, items: list[bytes]) -> bytes:
    out = struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, 0xFFFFFFFF)
    for item in items:
        out += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
        out += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def test_un_of_undefined_length_inside_a_sequence_is_read_as_implicit_vr() -> None:
    """PS3.5 6.2.2: the content of an undefined-length UN is Implicit VR Little Endian,
    also when the UN sits inside an item of an explicit-VR sequence."""
    inner = _implicit(0x00100020, b"ID01")  # implicit VR inside the UN
    un = _undefined(0x00091010, b"UN", [inner])
    seq = _undefined(0x00081115, b"SQ", [_explicit(0x00081150, b"UI", b"1.2\0") + un])
    data = (_explicit(SOP, b"UI", b"1.2.3\0") + seq + _explicit(STUDY, b"UI", b"1.2.4\0")
            + _explicit(SERIES, b"UI", b"1.2.5\0"))
    found: dict[int, bytes] = {}
    assert walk(data, 0, implicit=False, wanted={SOP, STUDY, SERIES}, found=found) == (-1, len(data))
    assert found == {SOP: b"1.2.3\0", STUDY: b"1.2.4\0", SERIES: b"1.2.5\0"}
    info = read_header(memoryview(data), "1.2.840.10008.1.2.1")
    assert (info.study_uid, info.series_uid, info.sop_instance_uid) == ("1.2.4", "1.2.5", "1.2.3")


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.2"])
def test_agrees_with_pydicom_on_nested_sequences(syntax: str) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.CodeValue = "X"
    item.ConceptCodeSequence = Sequence([Dataset()])
    item.ConceptCodeSequence[0].CodeMeaning = "deep"
    ds.ContentSequence = Sequence([item, item])
    ds.StudyInstanceUID = "1.2.3.5"
    ds.SeriesInstanceUID = "1.2.3.6"
    ds.PatientName = "Doe^J"
    buf = io.BytesIO()
    ts = pydicom.uid.UID(syntax)
    pydicom.dcmwrite(buf, ds, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                     enforce_file_format=False)
    found: dict[int, bytes] = {}
    walk(buf.getvalue(), 0, implicit=ts.is_implicit_VR, little=ts.is_little_endian,
         wanted={STUDY, SERIES, SOP}, found=found)
    assert {k: v.rstrip(b"\0").decode() for k, v in found.items()} == {
        SOP: "1.2.3.4", STUDY: "1.2.3.5", SERIES: "1.2.3.6"}


def test_stops_at_the_first_tag_at_or_after_stop_at() -> None:
    data = (_explicit(SOP, b"UI", b"1.2\0") + _explicit(STUDY, b"UI", b"1.3\0")
            + _explicit(0x7FE00010, b"OB", b"\1\2\3\4"))
    tag, pos = walk(data, 0, implicit=False, stop_at=0x7FE00010)
    assert tag == 0x7FE00010
    assert element_header(data, pos, implicit=False) == (0x7FE00010, pos + 12, 4)


def test_refuses_what_it_cannot_follow() -> None:
    good = _explicit(SOP, b"UI", b"1.2\0")
    with pytest.raises(WalkError, match="past the end"):
        walk(good + _explicit(STUDY, b"UI", b"1.3\0")[:-2] + b"", 0, implicit=False)
    with pytest.raises(WalkError, match="explicit VR"):
        walk(good + b"\x20\x00\x0d\x00\x01\x02\x04\x00abcd", 0, implicit=False)
    deep = _explicit(SOP, b"UI", b"1\0")
    for _ in range(MAX_DEPTH + 2):
        deep = _undefined(0x00081115, b"SQ", [deep])
    with pytest.raises(WalkError, match="nested too deeply"):
        walk(deep, 0, implicit=False)
