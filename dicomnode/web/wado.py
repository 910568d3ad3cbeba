"""WADO-RS (PS3.18 10.4): retrieve stored instances, their metadata, frames and bulk data.

Instances are streamed as stored; metadata is DICOM JSON with bulk data as
BulkDataURIs absolute to the request's base URL; frames are cut from native pixel
data or taken from the encapsulated fragments as stored.
"""

from __future__ import annotations

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

    def frames(self, row: StoredInstance, numbers: list[int]) -> list[bytes]:
        import pydicom
        from pydicom.encaps import generate_frames

        ds = pydicom.dcmread(self.path(row))
        if "PixelData" not in ds:
            raise HTTPError(404, "not found")
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if any(k < 1 or k > n for k in numbers):
            raise HTTPError(404, "no such frame")
        ts = ds.file_meta.TransferSyntaxUID
        data = ds.PixelData
        if ts.is_compressed:
            frames = list(generate_frames(data, number_of_frames=n))
            return [frames[k - 1] for k in numbers]
        if not ts.is_little_endian:
            raise HTTPError(406, "big-endian pixel data is not served")
        bits = int(ds.BitsAllocated)
        per = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        if bits == 1:
            import numpy as np

            allbits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            return [np.packbits(allbits[(k - 1) * per : k * per], bitorder="little").tobytes()
                    for k in numbers]
        size = per * bits // 8
        return [bytes(data[(k - 1) * size : k * size]) for k in numbers]

