"""One file of a series: its header values and its stored pixel values.

:func:`read_slice` reads the attributes the volume loader needs from a Part 10 file
with the one element walker (:mod:`dicomnode.core.elements`, PS3.5 7.1, 7.5), and finds
native (uncompressed) Pixel Data, which :func:`stored_values` then reads with
``np.frombuffer`` straight from the file's bytes. Anything the walker is unsure of
(no preamble, deflate, float pixel data, odd bit depths, a length that does not add
up) is read by pydicom instead, which also decodes encapsulated pixel data (JPEG,
JPEG-LS, JPEG 2000, RLE) with its plugins. :func:`rescale_into` applies the Modality
LUT's Rescale Slope/Intercept (PS3.3 C.11.1.1.2).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.core.elements import UNDEFINED, WalkError, element_header, walk
from dicomnode.errors import InvalidInstanceError

logger = logging.getLogger(__name__)

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_TRANSFER_SYNTAX = 0x00020010
_PIXEL_DATA = 0x7FE00010
_OTHER_PIXEL_DATA = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data
_MODALITY_LUT_SEQUENCE = 0x00283000

# Top-level attributes read from each file: tag -> (keyword, VR).
_WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x00180050: ("SliceThickness", "DS"),
    0x00180088: ("SpacingBetweenSlices", "DS"),
    0x00181120: ("GantryDetectorTilt", "DS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00200052: ("FrameOfReferenceUID", "UI"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
_WANTED_OR_LUT = frozenset(_WANTED) | {_MODALITY_LUT_SEQUENCE}

@dataclass(slots=True)
class Slice:
    """What one file contributes: its header values and where its pixels are."""

    path: Path
    attrs: dict[str, object]
    transfer_syntax: str
    data: bytes | None  # the file's bytes (native fast path / deferred decode)
    pixel_offset: int = -1  # >= 0: native pixel data at this offset in ``data``
    dtype: str = ""  # numpy dtype of the native pixel data
    dataset: Dataset | None = None  # set when pydicom parsed the whole file
    has_pixel_data: bool = True

    def get(self, keyword: str, default: object = None) -> object:
        value = self.attrs.get(keyword)
        return default if value is None or value == "" else value


# --------------------------------------------------------------------------- reading


def _decode_value(raw: bytes, vr: str, little: bool) -> object:
    if vr == "US":
        if len(raw) < 2:
            return None
        return int.from_bytes(raw[:2], "little" if little else "big")
    text = raw.decode("ascii", "replace").strip(" \x00")
    if vr in ("UI", "CS") and "\\" not in text:
        return text
    if vr == "CS":
        return [part.strip() for part in text.split("\\")]
    if vr == "UI":
        return text
    if not text:
        return None
    try:
        if vr == "IS":
            return int(float(text.split("\\")[0]))
        values = [float(part) for part in text.split("\\")]
    except ValueError:
        raise WalkError(f"unparsable {vr} value {text!r}") from None
    return values[0] if len(values) == 1 else values


def _walk(path: Path, data: bytes) -> Slice:
    """Read the header values and find the Pixel Data of a Part 10 file (PS3.10 7.1).

    Visits only the top-level data set and skips sequences; raises ``WalkError``
    for anything it does not handle, so that pydicom reads the file instead.
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        raise WalkError("no Part 10 preamble")
    meta: dict[int, bytes] = {}
    # File Meta Information: always Explicit VR Little Endian, group 0002 (PS3.10 7.1)
    _, pos = walk(data, 132, implicit=False, wanted=(_TRANSFER_SYNTAX,), found=meta,
                  stop_at=0x00030000)
    transfer_syntax = meta.get(_TRANSFER_SYNTAX, b"").decode("ascii", "replace").strip(" \x00")
    if transfer_syntax == _IMPLICIT_LE:
        implicit, little = True, True
    elif transfer_syntax == _EXPLICIT_BE:
        implicit, little = False, False
    elif transfer_syntax and transfer_syntax != _DEFLATED_LE:
        implicit, little = False, True  # Explicit VR LE and every encapsulated syntax
    else:
        raise WalkError(f"transfer syntax {transfer_syntax or '(none)'} needs pydicom")

    raw: dict[int, bytes] = {}
    tag, pos = walk(data, pos, implicit=implicit, little=little, wanted=_WANTED_OR_LUT,
                    found=raw, stop_at=_OTHER_PIXEL_DATA[0])
    if tag in _OTHER_PIXEL_DATA:
        raise WalkError("float pixel data")
    pixel_pos, pixel_length = -1, 0
    if tag == _PIXEL_DATA:
        _, pixel_pos, pixel_length = element_header(data, pos, implicit=implicit, little=little)
    modality_lut = raw.pop(_MODALITY_LUT_SEQUENCE, None) is not None
    attrs: dict[str, object] = {}
    for tag, value in raw.items():
        keyword, wanted_vr = _WANTED[tag]
        attrs[keyword] = _decode_value(value, wanted_vr, little)
    attrs["_modality_lut_sequence"] = modality_lut
    item = Slice(path, attrs, transfer_syntax, data, has_pixel_data=pixel_pos >= 0)
    if pixel_pos < 0 or pixel_length == UNDEFINED:
        return item  # no pixel data (refused later) or encapsulated (pydicom decodes)
    bits = item.get("BitsAllocated")
    rows, cols = item.get("Rows"), item.get("Columns")
    frames, samples = item.get("NumberOfFrames", 1), item.get("SamplesPerPixel", 1)
    if bits not in (8, 16, 32) or not isinstance(rows, int) or not isinstance(cols, int):
        raise WalkError("pixel layout needs pydicom")
    if not isinstance(frames, int) or not isinstance(samples, int):
        raise WalkError("odd NumberOfFrames or SamplesPerPixel")
    expected = rows * cols * frames * samples * (bits // 8)
    if pixel_length < expected or pixel_pos + expected > len(data):
        raise WalkError("pixel data shorter than Rows x Columns x BitsAllocated")
    signed = item.get("PixelRepresentation", 0) == 1
    item.pixel_offset = pixel_pos
    item.dtype = ("<" if little else ">") + ("i" if signed else "u") + str(bits // 8)
    return item


def _from_dataset(path: Path, data: bytes) -> Slice:
    """Read a file with pydicom (the fallback for anything the walker does not handle)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for malformed files
        raise InvalidInstanceError(f"{path.name}: not a readable DICOM file: {exc}") from None
    attrs: dict[str, object] = {}
    for keyword, _vr in _WANTED.values():
        value = ds.get(keyword)
        if value is None:
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            value = [float(v) if _vr == "DS" else str(v) for v in value]
        elif _vr == "DS":
            value = float(value)
        elif _vr in ("IS", "US"):
            value = int(value)
        else:
            value = str(value)
        attrs[keyword] = value
    attrs["_modality_lut_sequence"] = "ModalityLUTSequence" in ds
    transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if ds.file_meta else ""
    return Slice(path, attrs, transfer_syntax, None, dataset=ds,
                  has_pixel_data="PixelData" in ds)


def read_slice(path: Path) -> Slice:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInstanceError(f"{path}: cannot be read: {exc}") from None
    try:
        return _walk(path, data)
    except (WalkError, RecursionError) as exc:
        logger.debug("%s: read by pydicom (%s)", path.name, exc)
        return _from_dataset(path, data)


# --------------------------------------------------------------------------- decoding


def stored_values(item: Slice, rows: int, cols: int) -> np.ndarray:
    """The stored values of one slice as an integer (rows, cols) array (PS3.5 8)."""
    if item.pixel_offset >= 0 and item.data is not None:
        arr = np.frombuffer(item.data, dtype=item.dtype, count=rows * cols, offset=item.pixel_offset)
        arr = arr.reshape(rows, cols)
        return _mask_unused_bits(arr, item)
    ds = item.dataset
    try:
        if ds is None:
            assert item.data is not None
            ds = pydicom.dcmread(io.BytesIO(item.data))
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types
        name = pydicom.uid.UID(item.transfer_syntax).name if item.transfer_syntax else "?"
        raise InvalidInstanceError(
            f"{item.path.name}: pixel data ({name}) could not be decoded: {exc}"
        ) from None
    if arr.shape != (rows, cols):
        raise InvalidInstanceError(
            f"{item.path.name}: decoded pixel data has shape {arr.shape}, expected {(rows, cols)}"
        )
    return arr


def _mask_unused_bits(arr: np.ndarray, item: Slice) -> np.ndarray:
    """Ignore bits above Bits Stored (PS3.5 8.1.1), as pydicom does; copies only if needed."""
    bits = 8 * arr.dtype.itemsize
    stored = item.get("BitsStored", bits)
    assert isinstance(stored, int)
    if stored >= bits or stored <= 0:
        return arr
    if arr.dtype.kind == "u":
        if int(arr.max()) < (1 << stored):
            return arr
    else:
        lo, hi = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
        if int(arr.min()) >= lo and int(arr.max()) <= hi:
            return arr
    out = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    np.left_shift(out, bits - stored, out=out)
    np.right_shift(out, bits - stored, out=out)
    return out


def rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """``out[...] = stored * slope + intercept`` (PS3.3 C.11.1.1.2), exact to float32.

    Integer slope and intercept on 8/16-bit values stay below 2**24, where float32
    arithmetic is exact: convert in place, then scale and shift in place (cheapest on
    fresh memory). Anything else is computed in float64 and rounded once.
    """
    exact = (
        stored.dtype.itemsize <= 2
        and slope.is_integer()
        and intercept.is_integer()
        and 65536 * abs(slope) + abs(intercept) < 2**24
    )
    if exact:
        np.copyto(out, stored, casting="unsafe")
        if slope != 1.0:
            np.multiply(out, np.float32(slope), out=out)
        if intercept != 0.0:
            np.add(out, np.float32(intercept), out=out)
    else:
        np.copyto(out, stored * slope + intercept, casting="same_kind")


