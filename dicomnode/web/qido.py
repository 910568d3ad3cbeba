"""QIDO-RS (PS3.18 10.6): search the studies, series and instances the node holds.

Answers come from the index (which instances exist, where) plus a few attributes read
once from one stored header per study/series/instance.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from starlette.requests import Request

from dicomnode.core.dicomweb import HTTPError, attr, int_or_none, pn
from dicomnode.core.index import Index, StoredInstance
from dicomnode.core.layout import StorageLayout


def _read_meta(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


class _HeaderCache:
    """A few header attributes per stored file, read once (path -> dict)."""

    def __init__(self, size: int = 4096) -> None:
        self._d: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._size = size

    def get(self, path: Path) -> dict[str, Any]:
        key = str(path)
        with self._lock:
            hit = self._d.get(key)
        if hit is not None:
            return hit
        try:
            ds = _read_meta(path)
        except Exception:
            ds = None
        out: dict[str, Any] = {}
        if ds is not None:
            for kw in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                       "StudyDescription", "PatientID", "PatientBirthDate", "PatientSex",
                       "Modality", "SeriesNumber", "SeriesDescription", "InstanceNumber",
                       "Rows", "Columns", "NumberOfFrames", "ReferringPhysicianName"):
                v = ds.get(kw)
                if v is not None and v != "":
                    out[kw] = v
            name = ds.get("PatientName")
            if name:
                out["PatientName"] = str(name)
        with self._lock:
            if len(self._d) >= self._size:
                self._d.clear()
            self._d[key] = out
        return out



class Qido:
    """The QIDO-RS searches over one index and storage folder."""

    def __init__(self, index: Index, layout: StorageLayout) -> None:
        self.index = index
        self.layout = layout
        self.headers = _HeaderCache()

    def path(self, row: StoredInstance) -> Path:
        try:
            return self.layout.resolve(row.path)
        except ValueError:
            raise HTTPError(404, "not found") from None

    def _filters(self, request: Request) -> dict[str, str]:
        q = request.query_params
        out = {}
        for key, tag in (("StudyInstanceUID", "0020000D"), ("PatientID", "00100020"),
                         ("Modality", "00080060"), ("ModalitiesInStudy", "00080061"),
                         ("SeriesInstanceUID", "0020000E"), ("SOPInstanceUID", "00080018")):
            v = q.get(key) or q.get(tag)
            if v:
                out[key] = v
        return out

    @staticmethod
    def _paging(request: Request) -> tuple[int, int]:
        try:
            limit = max(0, int(request.query_params.get("limit", "0")))
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            raise HTTPError(400, "invalid limit or offset") from None
        return limit, offset

    def _study_json(self, study: str, rows: list[StoredInstance]) -> dict[str, Any]:
        h = self.headers.get(self.path(rows[0]))
        modalities = sorted({self._series_modality(r) for r in self._series_heads(rows)} - {""})
        out = {
            "00080020": attr("DA", str(h.get("StudyDate", ""))),
            "00080030": attr("TM", str(h.get("StudyTime", ""))),
            "00080050": attr("SH", str(h.get("AccessionNumber", ""))),
            "00080061": attr("CS", *modalities),
            "00080090": pn(str(h.get("ReferringPhysicianName", ""))),
            "00100010": pn(str(h.get("PatientName", ""))),
            "00100020": attr("LO", str(h.get("PatientID", ""))),
            "00100030": attr("DA", str(h.get("PatientBirthDate", ""))),
            "00100040": attr("CS", str(h.get("PatientSex", ""))),
            "0020000D": attr("UI", study),
            "00200010": attr("SH", str(h.get("StudyID", ""))),
            "00201206": attr("IS", len({r.series_uid for r in rows})),
            "00201208": attr("IS", len(rows)),
        }
        if h.get("StudyDescription"):
            out["00081030"] = attr("LO", str(h["StudyDescription"]))
        return out

    @staticmethod
    def _series_heads(rows: list[StoredInstance]) -> list[Any]:
        seen: dict[str, Any] = {}
        for r in rows:
            seen.setdefault(r.series_uid, r)
        return list(seen.values())

    def _series_modality(self, row: StoredInstance) -> str:
        return str(self.headers.get(self.path(row)).get("Modality", ""))

    def _series_json(self, study: str, series: str, rows: list[StoredInstance]) -> dict[str, Any]:
        h = self.headers.get(self.path(rows[0]))
        out = {
            "00080060": attr("CS", str(h.get("Modality", ""))),
            "0020000D": attr("UI", study),
            "0020000E": attr("UI", series),
            "00200011": attr("IS", int_or_none(h.get("SeriesNumber"))),
            "00201209": attr("IS", len(rows)),
        }
        if h.get("SeriesDescription"):
            out["0008103E"] = attr("LO", str(h["SeriesDescription"]))
        return out

    def _instance_json(self, row: StoredInstance) -> dict[str, Any]:
        h = self.headers.get(self.path(row))
        out = {
            "00080016": attr("UI", row.sop_class_uid),
            "00080018": attr("UI", row.sop_instance_uid),
            "00080060": attr("CS", str(h.get("Modality", ""))),
            "00020010": attr("UI", row.transfer_syntax),
            "0020000D": attr("UI", row.study_uid),
            "0020000E": attr("UI", row.series_uid),
            "00200013": attr("IS", int_or_none(h.get("InstanceNumber"))),
        }
        for kw, tag, vr in (("Rows", "00280010", "US"), ("Columns", "00280011", "US"),
                            ("NumberOfFrames", "00280008", "IS")):
            if h.get(kw) is not None:
                out[tag] = attr(vr, int_or_none(h[kw]))
        return out

    def _rows(self, study: str | None = None, series: str | None = None
              ) -> list[StoredInstance]:
        return self.index.instances(study_uid=study, series_uid=series, offered=True)

    def qido_studies(self, request: Request) -> list[dict[str, Any]]:
        f = self._filters(request)
        limit, offset = self._paging(request)
        by_study: dict[str, list[StoredInstance]] = {}
        study = f.get("StudyInstanceUID")
        for r in self._rows(study=study):
            by_study.setdefault(r.study_uid, []).append(r)
        out = []
        for uid, rows in by_study.items():
            js = self._study_json(uid, rows)
            if "PatientID" in f and not _match(f["PatientID"], js["00100020"]):
                continue
            mod = f.get("ModalitiesInStudy") or f.get("Modality")
            if mod and mod not in js["00080061"].get("Value", []):
                continue
            out.append(js)
        return _page(out, limit, offset)

    def qido_series(self, request: Request, study: str | None) -> list[dict[str, Any]]:
        f = self._filters(request)
        limit, offset = self._paging(request)
        study = study or f.get("StudyInstanceUID")
        by_series: dict[tuple[str, str], list[StoredInstance]] = {}
        for r in self._rows(study=study, series=f.get("SeriesInstanceUID")):
            by_series.setdefault((r.study_uid, r.series_uid), []).append(r)
        out = []
        for (st, se), rows in by_series.items():
            js = self._series_json(st, se, rows)
            if "Modality" in f and not _match(f["Modality"], js["00080060"]):
                continue
            if "PatientID" in f and not _match(
                    f["PatientID"], attr("LO", str(self.headers.get(self.path(rows[0]))
                                                    .get("PatientID", "")))):
                continue
            out.append(js)
        return _page(out, limit, offset)

    def qido_instances(self, request: Request, study: str | None,
                       series: str | None) -> list[dict[str, Any]]:
        f = self._filters(request)
        limit, offset = self._paging(request)
        rows = self._rows(study=study or f.get("StudyInstanceUID"),
                          series=series or f.get("SeriesInstanceUID"))
        out = []
        for r in rows:
            if "SOPInstanceUID" in f and r.sop_instance_uid != f["SOPInstanceUID"]:
                continue
            js = self._instance_json(r)
            if "Modality" in f and not _match(f["Modality"], js["00080060"]):
                continue
            out.append(js)
        return _page(out, limit, offset)

    # ---- WADO-RS ----------------------------------------------------------------------
def _match(pattern: str, attr: dict[str, Any]) -> bool:
    import fnmatch

    values = attr.get("Value", [])
    patterns = [p for p in pattern.split(",") if p]
    return any(fnmatch.fnmatchcase(str(v), p) for v in values for p in patterns)


def _page(items: list[Any], limit: int, offset: int) -> list[Any]:
    items = items[offset:]
    return items[:limit] if limit else items

