"""The frames of a BINARY Segmentation, assembled fast (PS3.3 A.51, C.8.20, C.7.6.16).

highdicom builds every Per-Frame Functional Groups item as a pydicom ``Dataset``: for a
300-slice CT and two segments that is 600 items of ~15 elements each, about 1.5 s of
the 2.4 s a SEG cost the node, plus 0.3 s to write them back out. Every item differs
from the next in five values only (the source SOP class and instance, the Image
Position (Patient), the Dimension Index Values and the Referenced Segment Number), so
this module lets highdicom decide *everything* on a two-plane SEG of the same series
and model, and expands that SEG to the whole series:

1. the source headers are read with the node's element walker
   (:func:`dicomnode.core.elements.walk`, the first bytes of each file only): SOP class
   and instance, series, frame of reference, rows, columns, Image Position and
   Orientation (Patient) as their encoded strings;
2. ``small`` = highdicom's SEG of the first two source slices (their labels do not
   matter: every frame is kept, and the Pixel Data is made afresh in step 4);
3. its first Per-Frame item is turned into a byte template with five slots; one item
   per (segment, plane) is written by filling the slots, in highdicom's frame order
   (segment by segment, planes sorted along the normal by highdicom's own
   ``_get_slice_distances``); Dimension Index Values follow the Dimension Index
   Sequence; positions are formatted as highdicom formats them
   (``DS(value, auto_format=True)``);
4. what depends on every plane is recomputed with highdicom's functions: Number of
   Frames, Source Image and Referenced Series Sequences (source order), Spacing
   Between Slices (``get_volume_positions``, unless the source gives it), Dimension
   Organization Type "3D" (one segment, regular spacing);
5. the Pixel Data is the label map bit-packed frame after frame (PS3.5 8.1.1,
   little-endian bit order), the only step that needs the labels: steps 1-4
   (:func:`expand`) can run while the model does (:func:`dicomnode.encode.seg.plan_seg`).

The two long sequences go into the dataset as raw, already encoded data elements
(Explicit VR Little Endian): pydicom writes them as they are and parses them only if
someone reads them. The result equals highdicom's SEG of the whole series element for
element, apart from what highdicom makes anew on every call (creation and content
times, the Dimension Organization UID): ``tests/test_seg_frames.py`` compares them on
synthetic and real series. Series this path does not cover (multi-frame or mixed
sources, no patient frame of reference, fewer than two slices, unusual encodings) go
to highdicom whole: :func:`eligible` says why.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.tag import Tag
from pydicom.valuerep import DS

from dicomnode.core.elements import WalkError, walk

logger = logging.getLogger(__name__)

# top-level tags read from each source
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_STUDY, _SERIES = 0x0020000D, 0x0020000E
_POSITION, _ORIENTATION, _FRAME_OF_REFERENCE = 0x00200032, 0x00200037, 0x00200052
_FRAMES, _ROWS, _COLUMNS = 0x00280008, 0x00280010, 0x00280011
_WANTED = frozenset({_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _POSITION, _ORIENTATION,
                     _FRAME_OF_REFERENCE, _FRAMES, _ROWS, _COLUMNS})
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_HEAD_BYTES = 64 * 1024  # a CT header is a few KB; read more only when it is longer

# the five values that differ between Per-Frame Functional Groups items
_REF_CLASS, _REF_INSTANCE = 0x00081150, 0x00081155
_INDEX_VALUES, _SEGMENT_NUMBER = 0x00209157, 0x0062000B
_SLOTS = (_REF_CLASS, _REF_INSTANCE, _POSITION, _INDEX_VALUES, _SEGMENT_NUMBER)
_PFFG, _SOURCE_IMAGES, _REFERENCED_SERIES = 0x52009230, 0x00082112, 0x00081115
_REFERENCED_INSTANCES = 0x0008114A

_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item, undefined length
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class SourceRef:
    """What the SEG needs of one source instance, as encoded in its file."""

    sop_class: str
    sop_instance: str
    study: str
    series: str
    frame_of_reference: str
    rows: int
    columns: int
    frames: str  # Number of Frames as encoded ("" when absent)
    position: tuple[str, ...]  # Image Position (Patient), the encoded strings
    orientation: tuple[float, ...]  # Image Orientation (Patient)


def read_refs(paths: Sequence[Path]) -> list[SourceRef] | None:
    """The :class:`SourceRef` of every path, or None if one of them is beyond the walker
    (then the caller uses pydicom and highdicom for the whole SEG)."""
    out = []
    for path in paths:
        ref = _read_ref(Path(path))
        if ref is None:
            return None
        out.append(ref)
    return out


def _read_ref(path: Path) -> SourceRef | None:
    try:
        with path.open("rb") as f:
            data = f.read(_HEAD_BYTES)
            found = _walk_header(data)
            if found is None and len(data) == _HEAD_BYTES:
                data += f.read()  # a long header: read the rest
                found = _walk_header(data)
    except OSError:
        return None
    if found is None:
        return None
    little = found.pop(-1) == b"little"
    text = {t: v.decode("latin-1").rstrip("\x00 ").lstrip(" ") for t, v in found.items()
            if t not in (_ROWS, _COLUMNS)}
    try:
        rows = struct.unpack("<H" if little else ">H", found[_ROWS])[0]
        columns = struct.unpack("<H" if little else ">H", found[_COLUMNS])[0]
        orientation = tuple(float(v) for v in text[_ORIENTATION].split("\\"))
        position = tuple(v.strip() for v in text[_POSITION].split("\\"))
        return SourceRef(text[_SOP_CLASS], text[_SOP_INSTANCE], text[_STUDY], text[_SERIES],
                         text[_FRAME_OF_REFERENCE], rows, columns, text.get(_FRAMES, ""),
                         position, orientation)
    except (KeyError, ValueError, struct.error):
        return None  # something missing or odd: highdicom says what exactly


def _walk_header(data: bytes) -> dict[int, bytes] | None:
    """The wanted raw values of a Part 10 file's top-level data set (plus key -1: byte
    order), or None when the walker cannot follow it within ``data``."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    meta: dict[int, bytes] = {}
    try:
        _, pos = walk(data, 132, implicit=False, wanted=(_TRANSFER_SYNTAX,), found=meta,
                      stop_at=0x00030000)
        syntax = meta.get(_TRANSFER_SYNTAX, b"").decode("ascii", "replace").strip(" \x00")
        if syntax == _IMPLICIT_LE:
            implicit = True
        elif syntax == _EXPLICIT_LE or syntax.startswith("1.2.840.10008.1.2.4"):
            implicit = False  # native or encapsulated, Explicit VR Little Endian headers
        else:
            return None
        found: dict[int, bytes] = {}
        tag, _ = walk(data, pos, implicit=implicit, wanted=_WANTED, found=found,
                      stop_at=_PIXEL_DATA)
    except WalkError:
        return None
    if tag != _PIXEL_DATA:
        return None  # cut short (or no pixel data): read more, or leave it to pydicom
    found[-1] = b"little"
    return found


def eligible(refs: Sequence[SourceRef]) -> str:
    """Why these sources need highdicom for the whole SEG; "" when the fast path applies."""
    if len(refs) < 2:
        return "fewer than two source instances"
    first = refs[0]
    if first.frames not in ("", "1"):
        return "multi-frame source"
    if not first.frame_of_reference:
        return "no frame of reference"
    key = (first.sop_class, first.study, first.series, first.rows, first.columns,
           first.frame_of_reference, first.frames, first.orientation)
    for ref in refs[1:]:
        if (ref.sop_class, ref.study, ref.series, ref.rows, ref.columns,
                ref.frame_of_reference, ref.frames, ref.orientation) != key:
            return "sources differ in class, series, size, frame of reference or orientation"
    if any(len(r.position) != 3 for r in refs) or len(first.orientation) != 6:
        return "odd Image Position or Orientation (Patient)"
    return ""


# -- encoding --------------------------------------------------------------------------


def _encode(elem: DataElement) -> bytes:
    """One data element, Explicit VR Little Endian, as pydicom writes it."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _short(tag: int, vr: bytes, value: bytes) -> bytes:
    """A short-form explicit VR element (PS3.5 7.1.2) whose value is already padded."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(tag: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return _short(tag, b"UI", raw + b"\x00" if len(raw) % 2 else raw)


def _template(item: Dataset) -> list[bytes | int]:
    """``item`` encoded as byte chunks, with each slot tag in :data:`_SLOTS` left as an
    int where its whole element goes. Sequences and items get undefined lengths."""
    out: list[bytes | int] = []
    for elem in item:
        if elem.tag in _SLOTS:
            out.append(int(elem.tag))
        elif elem.VR == "SQ":
            out.append(struct.pack("<HH", elem.tag.group, elem.tag.element)
                       + b"SQ\x00\x00\xff\xff\xff\xff")
            for sub in elem.value:
                out.append(_ITEM)
                out.extend(_template(sub))
                out.append(_ITEM_END)
            out.append(_SEQUENCE_END)
        else:
            out.append(_encode(elem))
    # merge neighbouring bytes
    merged: list[bytes | int] = []
    for part in out:
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + part
        else:
            merged.append(part)
    return merged


def _positions_encoded(refs: Sequence[SourceRef]) -> tuple[list[bytes], np.ndarray]:
    """Each source's Image Position (Patient) element as highdicom writes it in a
    Plane Position Sequence (``DS(value, auto_format=True)`` of the source's value), and
    the positions as floats (n, 3)."""
    formatted: dict[str, tuple[str, float]] = {}  # x and y repeat from slice to slice

    def fmt(raw: str) -> tuple[str, float]:
        if raw not in formatted:
            value = DS(DS(raw), auto_format=True)
            if value is None:  # an empty component: highdicom would refuse it
                raise ValueError(f"empty Image Position (Patient) component {raw!r}")
            formatted[raw] = (str(value), float(value))
        return formatted[raw]

    encoded, values = [], []
    for ref in refs:
        parts = [fmt(v) for v in ref.position]
        text = "\\".join(t for t, _ in parts).encode("ascii")
        encoded.append(_short(_POSITION, b"DS", text + b" " if len(text) % 2 else text))
        values.append([v for _, v in parts])
    return encoded, np.array(values, dtype=float)


def _raw_sequence(tag: int, items: Iterable[bytes]) -> RawDataElement:
    """A sequence of already encoded items (each with its delimiters), defined length."""
    value = b"".join(items)
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


def expand(small: Dataset, refs: Sequence[SourceRef], n_segments: int, *,
           source_spacing: bool) -> tuple[Dataset, np.ndarray]:
    """Turn ``small`` (highdicom's SEG of ``refs[:2]``) into the SEG of every source,
    all but its Pixel Data (:func:`fill_pixels`); returns it and the planes' frame order.

    Nothing here depends on the labels, so it may run while the model does.
    ``source_spacing``: the source header gives Spacing Between Slices (then highdicom
    copies it instead of computing it).
    """
    from highdicom.image import _get_slice_distances
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
    from pydicom.valuerep import format_number_as_ds

    n = len(refs)
    pointers = [int(i.DimensionIndexPointer) for i in small.DimensionIndexSequence]
    if sorted(pointers) != sorted([_SEGMENT_NUMBER, _POSITION]) or len(pointers) != 2:
        raise ValueError(f"unexpected Dimension Index Sequence {pointers}")
    shared = small.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]

    # highdicom's plane order: unique distances along its normal, ascending
    positions, values = _positions_encoded(refs)
    normal = get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION)
    distances = _get_slice_distances(values, normal)
    _, order = np.unique(distances, return_index=True)
    if len(order) != n:
        raise ValueError("Plane positions must not contain duplicates.")

    template = _template(small.PerFrameFunctionalGroupsSequence[0])
    # with one segment, highdicom puts its Segment Identification in the shared groups
    slots = set(_SLOTS) if n_segments > 1 else set(_SLOTS) - {_SEGMENT_NUMBER}
    found = [p for p in template if isinstance(p, int)]
    if sorted(found) != sorted(slots):
        raise ValueError(f"unexpected Per-Frame Functional Groups item (slots {found})")
    classes = [_ui(_REF_CLASS, r.sop_class) for r in refs]
    instances = [_ui(_REF_INSTANCE, r.sop_instance) for r in refs]
    items = []
    for segment in range(1, n_segments + 1):
        number = _short(_SEGMENT_NUMBER, b"US", struct.pack("<H", segment))
        for rank, plane in enumerate(order, start=1):
            index = {_SEGMENT_NUMBER: segment, _POSITION: rank}
            fill = {
                _REF_CLASS: classes[plane],
                _REF_INSTANCE: instances[plane],
                _POSITION: positions[plane],
                _INDEX_VALUES: _short(_INDEX_VALUES, b"UL",
                                      struct.pack("<2I", *(index[p] for p in pointers))),
                _SEGMENT_NUMBER: number,
            }
            items.append(_ITEM + b"".join(p if isinstance(p, bytes) else fill[p]
                                          for p in template) + _ITEM_END)

    seg = small
    seg.NumberOfFrames = n_segments * n
    measures = shared.PixelMeasuresSequence[0]
    if not source_spacing:
        spacing, _ = get_volume_positions(image_positions=values.tolist(),
                                          image_orientation=orientation)
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
        elif "SpacingBetweenSlices" in measures:
            del measures.SpacingBetweenSlices
    if n_segments == 1:
        spacing, _ = get_volume_positions(image_positions=values.tolist(),
                                          image_orientation=orientation, sort=False)
        if spacing is not None and spacing > 0.0:
            seg.DimensionOrganizationType = "3D"
        elif "DimensionOrganizationType" in seg:
            del seg.DimensionOrganizationType
    # what pydicom would do while writing (OB or OW -> OB for 1-bit pixels), done now,
    # before the raw sequences go in: pydicom then writes those as they are, without
    # parsing and re-encoding them
    correct_ambiguous_vr(seg, True)
    seg.set_original_encoding(False, True, seg._character_set)

    seg[_PFFG] = _raw_sequence(_PFFG, items)
    refs_items = [_ITEM + _ui(_REF_CLASS, r.sop_class) + _ui(_REF_INSTANCE, r.sop_instance)
                  + _ITEM_END for r in refs]
    seg[_SOURCE_IMAGES] = _raw_sequence(_SOURCE_IMAGES, refs_items)
    if len({r.series for r in refs}) != 1:
        raise ValueError("sources of more than one series")
    instances_seq = (struct.pack("<HH", _REFERENCED_INSTANCES >> 16, _REFERENCED_INSTANCES & 0xFFFF)
                     + b"SQ\x00\x00\xff\xff\xff\xff" + b"".join(refs_items) + _SEQUENCE_END)
    seg[_REFERENCED_SERIES] = _raw_sequence(
        _REFERENCED_SERIES, [_ITEM + instances_seq + _ui(_SERIES, refs[0].series) + _ITEM_END])
    return seg, order


def fill_pixels(seg: Dataset, order: np.ndarray, segments: np.ndarray, n_segments: int) -> None:
    """Put the Pixel Data of ``segments`` (the label map of segment numbers 0..n_segments,
    ``segments[k]`` on source ``k``) into ``seg`` made by :func:`expand`."""
    frames = int(seg.NumberOfFrames)
    if segments.shape[0] * n_segments != frames or segments.shape[0] != len(order):
        raise ValueError(f"segments: {segments.shape[0]} slices for {len(order)} sources")
    seg[_PIXEL_DATA].value = pack_frames(segments, order, n_segments)


def pack_frames(segments: np.ndarray, order: np.ndarray, n_segments: int) -> bytes:
    """BINARY Pixel Data (PS3.5 8.1.1, PS3.3 C.8.20.2.1): for each segment, for each
    plane in ``order``, the frame ``segments[plane] == segment``, one bit per pixel,
    least significant bit first, frames back to back; padded to an even length."""
    n = len(order)
    if np.array_equal(order, np.arange(n)):
        ordered = segments
    elif np.array_equal(order, np.arange(n)[::-1]):
        ordered = segments[::-1]  # a view: highdicom's order is often the volume's reversed
    else:
        ordered = segments[order]
    rows, cols = ordered.shape[1:]
    if (rows * cols) % 8 == 0:
        # frames end on byte boundaries: pack a few planes at a time (cache-sized blocks,
        # twice as fast as one pass over the whole volume)
        frame_bytes = rows * cols // 8
        out = np.empty(n_segments * n * frame_bytes, dtype=np.uint8)
        block = np.empty((min(16, n), rows, cols), dtype=bool)
        for segment in range(1, n_segments + 1):
            for k in range(0, n, len(block)):
                planes = ordered[k:k + len(block)]
                mask = block[:len(planes)]
                np.equal(planes, segment, out=mask)
                start = ((segment - 1) * n + k) * frame_bytes
                out[start:start + len(planes) * frame_bytes] = np.packbits(
                    mask, axis=None, bitorder="little")
        data = out.tobytes()
    else:  # bits run on from one frame into the next
        flat = ordered.reshape(n, -1)
        bits = np.concatenate([(flat == s).ravel() for s in range(1, n_segments + 1)])
        data = np.packbits(bits, bitorder="little").tobytes()
    # odd lengths are padded as highdicom pads them (with b"0", not a null byte); the
    # padding lies beyond the last frame's bits and no reader looks at it
    return data + b"0" if len(data) % 2 else data
