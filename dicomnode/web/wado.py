"""WADO-RS (PS3.18 10.4): retrieve stored instances, their metadata, frames and bulk data.

Instances are streamed as stored; metadata is DICOM JSON with bulk data as
BulkDataURIs absolute to the request's base URL; frames are cut from native pixel
data or taken from the encapsulated fragments as stored, or decoded to native pixels
when the client asks for uncompressed frames (:func:`choose_frame_syntax`); only the
frames asked for are read from the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dicomnode.core.dicomweb import HTTPError
from dicomnode.core.index import Index, StoredInstance
from dicomnode.core.layout import StorageLayout

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class Wado:
    """The WADO-RS retrievals over one index and storage folder."""

    def __init__(self, index: Index, layout: StorageLayout) -> None:
        self.index = index
        self.layout = layout

    def path(self, row: StoredInstance) -> Path:
        try:
            return self.layout.resolve(row.path)
        except ValueError:
            raise HTTPError(404, "not found") from None

    def instance_rows(self, study: str, series: str | None = None,
                      sop: str | None = None) -> list[StoredInstance]:
        if sop is not None:
            rows = self.index.instances(study_uid=study, series_uid=series, sop_uid=sop,
                                         offered=True)
        else:
            rows = self.index.instances(study_uid=study, series_uid=series, offered=True)
        if not rows:
            raise HTTPError(404, "not found")
        return rows

    def metadata(self, row: StoredInstance, base: str) -> dict[str, Any]:
        import pydicom

        path = self.path(row)
        ds = pydicom.dcmread(path, defer_size=4096)
        prefix = (f"{base}/studies/{row.study_uid}/series/{row.series_uid}"
                  f"/instances/{row.sop_instance_uid}")
        pixel: dict[str, dict[str, Any]] = {}
        for tag in _PIXEL_TAGS:
            if tag in ds:
                elem = ds[tag]
                vr = elem.VR
                if vr not in ("OB", "OW", "OF", "OD"):
                    vr = "OW" if ds.get("BitsAllocated", 16) > 8 else "OB"
                pixel[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{prefix}/bulkdata/{tag:08X}"}
                del ds[tag]

        def handler(elem: Any) -> str:
            return f"{prefix}/bulkdata/{int(elem.tag):08X}"

        js = ds.to_json_dict(bulk_data_threshold=1 << 16, bulk_data_element_handler=handler)
        js.update(pixel)
        if ds.file_meta and "TransferSyntaxUID" in ds.file_meta:
            js["00020010"] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
        return dict(sorted(js.items()))

    def bulkdata(self, row: StoredInstance, tag: int) -> bytes:
        import pydicom

        ds = pydicom.dcmread(self.path(row))
        if tag not in ds:
            raise HTTPError(404, "not found")
        value = ds[tag].value
        if not isinstance(value, bytes | bytearray):
            raise HTTPError(404, "not found")
        return bytes(value)

    def frames(self, row: StoredInstance, numbers: list[int], accept: str | None
               ) -> tuple[list[bytes], str, str]:
        """The frames ``numbers`` (1-based) in the transfer syntax the Accept header asks
        (PS3.18 8.7.3.5): ``(frames, media type, transfer syntax)``. The stored bytes for
        ``transfer-syntax=*`` or the stored syntax; decoded to Explicit VR Little Endian
        for ``application/octet-stream`` without a syntax or with
        1.2.840.10008.1.2.1; HTTPError 406 when the stored frames can be neither."""
        import pydicom

        path = self.path(row)
        ds = pydicom.dcmread(path, defer_size=1024)
        if "PixelData" not in ds:
            raise HTTPError(404, "the instance has no pixel data")
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if any(k < 1 or k > n for k in numbers):
            raise HTTPError(404, f"no such frame (the instance has {n})")
        stored = str(ds.file_meta.TransferSyntaxUID)
        media, syntax, decode = choose_frame_syntax(accept, stored)
        if decode:
            return self._decoded(path, ds, numbers), media, syntax
        if stored not in _NATIVE:
            return _fragments(path, ds, numbers, n), media, syntax
        return _native_frames(path, ds, numbers), media, syntax

    @staticmethod
    def _decoded(path: Path, ds: Any, numbers: list[int]) -> list[bytes]:
        """Frames decoded to native pixels, little endian (PS3.5 8.1.1)."""
        import numpy as np
        from pydicom.pixels import pixel_array

        from dicomnode.core import decoders

        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows * cols * int(ds.get("SamplesPerPixel", 1) or 1) > _MAX_DECODED_VALUES:
            raise HTTPError(413, "the frames are too large to decode here; ask for"
                                 " transfer-syntax=*")
        decoders.register()
        out = []
        for k in numbers:
            try:
                arr = np.asarray(pixel_array(str(path), index=k - 1))
            except Exception:
                raise HTTPError(406, "the stored frames cannot be decoded; ask for"
                                     " transfer-syntax=*") from None
            out.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return out


# -- transfer syntaxes of frames (PS3.18 8.7.3.5, Table 8.7.3-5) -------------------------

EXPLICIT_LE = "1.2.840.10008.1.2.1"
_NATIVE = ("1.2.840.10008.1.2", EXPLICIT_LE)
_MAX_DECODED_VALUES = 1 << 27
#: media type of a compressed frame -> the transfer syntaxes it carries (first: default)
_FRAME_MEDIA: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                   "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jxl": ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111",
                  "1.2.840.10008.1.2.4.112"),
    "image/x-htj2k": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                      "1.2.840.10008.1.2.4.203"),
}
OCTET = "application/octet-stream"


def _accept_items(accept: str | None) -> list[tuple[str, str | None]]:
    """The (media type, transfer-syntax or None) a frames Accept header asks for, best
    first (q-values; ``multipart/related; type=...`` unwrapped; none: the default)."""
    if not accept or not accept.strip():
        return [(OCTET, None)]
    items: list[tuple[float, int, str, str | None]] = []
    for n, part in enumerate(re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", accept)):
        media, *params = (p.strip() for p in part.split(";"))
        values: dict[str, str] = {}
        for p in params:
            key, _, value = p.partition("=")
            values[key.strip().lower()] = value.strip().strip('"')
        media = media.lower()
        if media == "multipart/related":
            media = values.get("type", OCTET).lower()
        try:
            q = float(values.get("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            items.append((-q, n, media, values.get("transfer-syntax")))
    return [(m, ts) for _, _, m, ts in sorted(items)]


def choose_frame_syntax(accept: str | None, stored: str) -> tuple[str, str, bool]:
    """How to answer a frames request for frames stored in ``stored``:
    ``(media type, transfer syntax, decode?)``; HTTPError 406 when nothing acceptable
    can be made (the node decodes, it never encodes)."""
    compressed = stored not in _NATIVE and stored != "1.2.840.10008.1.2.2"
    for media, ts in _accept_items(accept):
        if media in ("*/*", OCTET) and ts == "*" or media == "*/*" and ts is None:
            if not compressed:
                return OCTET, EXPLICIT_LE, stored == "1.2.840.10008.1.2.2"
            return OCTET, stored, False
        if media in (OCTET, "*/*") and ts in (None, *_NATIVE):
            return OCTET, EXPLICIT_LE, compressed or stored == "1.2.840.10008.1.2.2"
        if compressed and ts == stored and media in (OCTET, "*/*", *_FRAME_MEDIA):
            if media in _FRAME_MEDIA and stored not in _FRAME_MEDIA[media]:
                continue
            return media if media != "*/*" else OCTET, stored, False
        if compressed and ts in (None, "*") and stored in _FRAME_MEDIA.get(media, ()):
            return media, stored, False
    raise HTTPError(406, f"the frames are stored as {stored}: available as that"
                         " (transfer-syntax=*) or decoded (application/octet-stream,"
                         f" {EXPLICIT_LE})")


def _native_frames(path: Path, ds: Any, numbers: list[int]) -> list[bytes]:
    """Frames cut from native little-endian pixel data, read from the file."""
    import numpy as np

    bits = int(ds.BitsAllocated)
    per = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    raw = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    if bits == 1 or offset is None:
        data = ds.PixelData
        if bits == 1:
            allbits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            return [np.packbits(allbits[(k - 1) * per : k * per], bitorder="little").tobytes()
                    for k in numbers]
        size = per * bits // 8
        return [bytes(data[(k - 1) * size : k * size]) for k in numbers]
    size = per * bits // 8
    length = int(getattr(raw, "length", 0) or 0)
    if length < size * max(numbers) or path.stat().st_size < offset + size * max(numbers):
        raise HTTPError(400, "the pixel data is shorter than the frames its header describes")
    out = []
    with path.open("rb") as f:
        for k in numbers:
            f.seek(offset + (k - 1) * size)
            chunk = f.read(size)
            if len(chunk) != size:
                raise HTTPError(404, "the pixel data is shorter than its frames")
            out.append(chunk)
    return out


def _fragments(path: Path, ds: Any, numbers: list[int], n: int) -> list[bytes]:
    """Encapsulated frames as stored (PS3.5 A.4), read from the file."""
    from pydicom.encaps import get_frame

    raw = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    try:
        if offset is None:
            data = ds.PixelData
            return [get_frame(data, k - 1, number_of_frames=n) for k in numbers]
        with path.open("rb") as f:
            out = []
            for k in numbers:
                f.seek(offset)
                out.append(get_frame(f, k - 1, number_of_frames=n))
            return out
    except (ValueError, KeyError) as exc:
        raise HTTPError(404, f"the frame cannot be read: {exc}") from None
