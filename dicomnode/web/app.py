"""The DICOMweb front door (PS3.18): STOW-RS in, QIDO-RS and WADO-RS out.

STOW-RS streams each multipart part to a temp file in the spool's ``tmp/`` folder,
then stores it exactly like the C-STORE handler does: validate the UIDs, read the
header, drop duplicates, ``Spool.store`` (fsync + rename + directory fsync), add
the index row, and only then count the instance as stored. The response lists
every instance's outcome (PS3.18 10.5.3).

QIDO-RS answers from the index plus one stored header per study/series/instance;
WADO-RS streams the stored files, their metadata (bulk data as BulkDataURIs,
absolute to the request's base URL) and single frames.

With ``tokens`` (name -> sha256 hex of the token) every request needs
``Authorization: Bearer <token>``; anything else gets the same 401 whatever the
path. Errors never carry a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.errors import InvalidInstanceError, InvalidUIDError, StorageError
from dicomnode.index import Index, InstanceRecord
from dicomnode.ingest.diskguard import DiskGuard
from dicomnode.ingest.header import read_header
from dicomnode.ingest.spool import Spool, validate_uid
from dicomnode.web.multipart import MultipartError, MultipartParser, Part, boundary_from

LOG = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
CALLING_AE = "STOW-RS"

# Store Instances Response failure reasons (PS3.18 Table 10.5.3-1 / PS3.4 B.2.3)
FAIL_PROCESSING = 0x0110
FAIL_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAIL_OUT_OF_RESOURCES = 0xA700
FAIL_MISMATCH = 0xA900
FAIL_CANNOT_UNDERSTAND = 0xC000
FAIL_TS_NOT_SUPPORTED = 0xC122

_CHUNK = 1 << 20
_HEADER_READ = 8 << 20  # the header attributes ingest needs lie within this
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass(frozen=True)
class WebLimits:
    max_request_bytes: int = 8 << 30
    max_part_bytes: int = 2 << 30
    max_parts: int = 20000


# -- authentication ---------------------------------------------------------------------

def hash_token(token: str) -> str:
    """The sha256 hex digest stored in the config for a bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BearerAuth:
    """ASGI middleware: 401 (same body for every path) unless a known bearer token is sent.

    With ``sessions`` (:class:`dicomnode.web.session.SessionStore`), a read (GET/HEAD)
    carrying a live session cookie of the node's own sign-in page passes too.
    """

    def __init__(self, app: ASGIApp, tokens: dict[str, str], sessions: Any = None) -> None:
        self.app = app
        self.hashes = [bytes.fromhex(h.strip().lower()) for h in tokens.values()]
        self.sessions = sessions

    def _ok(self, scope: Scope) -> bool:
        if self.sessions is not None and self.sessions.allows(scope):
            return True
        value = ""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                value = v.decode("latin-1")
                break
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for h in self.hashes:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(digest, h)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._ok(scope):
            resp = PlainTextResponse(
                "Unauthorized", 401, headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'}
            )
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


# -- DICOM JSON helpers ------------------------------------------------------------------

def _attr(vr: str, *values: Any) -> dict[str, Any]:
    vals = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": vals} if vals else {"vr": vr}


def _pn(name: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]} if name else {"vr": "PN"}


def _uid_or_404(value: str, what: str) -> str:
    try:
        return validate_uid(value, what)
    except InvalidUIDError:
        raise _HTTPError(404 if value else 400, f"no such {what}") from None


class _HTTPError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


# -- the application -------------------------------------------------------------------------

@dataclass
class _StudyTally:
    """What one STOW-RS request brought of one study (for its audit event)."""

    patient_id: str
    patient_name: str
    sop_classes: dict[str, int] = field(default_factory=dict)
    failed: int = 0


class DicomWeb:
    def __init__(self, config: Any, spool: Spool, index: Index, limits: WebLimits,
                 audit: Audit | None = None) -> None:
        self.config = config
        self.audit: Audit = audit or NullAudit()
        self.spool = spool
        self.index = index
        self.limits = limits
        self.headers = _HeaderCache()
        rc = getattr(config, "retention", None)
        self.disk_guard = (DiskGuard(spool.root, int(rc.min_free_gb * 1e9), rc.min_free_ratio)
                           if rc is not None else DiskGuard(spool.root))

    # ---- STOW-RS ----------------------------------------------------------------------

    async def stow(self, request: Request) -> Response:
        study_param = request.path_params.get("study")
        if study_param is not None:
            study_param = _uid_or_404(study_param, "study")
        try:
            boundary = boundary_from(request.headers.get("content-type", ""))
        except MultipartError as exc:
            LOG.warning("STOW-RS request refused: %s", exc.reason)
            return _error(exc.status, exc.reason)
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.limits.max_request_bytes:
                    return _error(413, "request too large")
            except ValueError:
                return _error(400, "invalid Content-Length")
        parser = MultipartParser(
            boundary, self.spool.tmp, max_part_bytes=self.limits.max_part_bytes,
            max_parts=self.limits.max_parts,
        )
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        base = _base_url(request)
        received = 0
        pending: list[Part] = []
        tallies: dict[str, _StudyTally] = {}
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.limits.max_request_bytes:
                    raise MultipartError("request too large", 413)
                if not chunk:
                    continue
                pending = await run_in_threadpool(parser.feed, chunk)
                while pending:
                    part = pending.pop(0)
                    await run_in_threadpool(self._store_part, part, study_param, base,
                                            referenced, failed, tallies)
            parser.finish()
        except MultipartError as exc:
            LOG.warning("STOW-RS request refused: %s", exc.reason)
            if not referenced and not failed:
                return _error(exc.status, exc.reason)
            # some instances were already stored: report them, and the rest as failed
            failed.append({"00081197": _attr("US", FAIL_CANNOT_UNDERSTAND)})
        except ClientDisconnect:
            LOG.warning("STOW-RS client went away mid-upload; its partial part is discarded")
            return _error(400, "incomplete request")
        except Exception:
            LOG.exception("STOW-RS request failed")
            if not referenced and not failed:
                return _error(500, "internal error")
            failed.append({"00081197": _attr("US", FAIL_PROCESSING)})
        finally:
            for p in pending:
                p.discard()
            parser.close()
        self._audit(request, tallies)
        if not referenced and not failed:
            LOG.warning("STOW-RS request refused: no instances in it")
            return _error(400, "no instances in the request")
        body: dict[str, Any] = {}
        if study_param:
            body["00081190"] = _attr("UR", f"{base}/studies/{study_param}")
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        status = 200 if not failed else (202 if referenced else 409)
        return JSONResponse(body, status, media_type=DICOM_JSON)

    def _audit(self, request: Request, tallies: dict[str, _StudyTally]) -> None:
        """One 'DICOM Instances Transferred' event per study a request brought."""
        from dicomnode.audit import events

        address = request.client.host if request.client else ""
        for study_uid, t in tallies.items():
            self.audit.record(events.instances_received, CALLING_AE, address,
                              str(getattr(self.config, "ae_title", "")), study_uid,
                              dict(t.sop_classes), t.patient_id, t.patient_name,
                              outcome=0 if not t.failed else 4)

    def _store_part(self, part: Part, study_param: str | None, base: str,
                    referenced: list[dict[str, Any]], failed: list[dict[str, Any]],
                    tallies: dict[str, _StudyTally] | None = None) -> None:
        try:
            outcome = self._store_file(part, study_param)
        except Exception:
            LOG.exception("unexpected error while storing a STOW-RS part")
            outcome = (FAIL_PROCESSING, "", "", None)
        finally:
            part.discard()
        reason, sop_class, sop_uid, where = outcome
        if where is not None and tallies is not None:
            study_uid, _series, patient_id, patient_name = where
            tally = tallies.setdefault(study_uid, _StudyTally(patient_id, patient_name))
            if reason == 0:
                tally.sop_classes[sop_class] = tally.sop_classes.get(sop_class, 0) + 1
            else:
                tally.failed += 1
        item: dict[str, Any] = {}
        if sop_class:
            item["00081150"] = _attr("UI", sop_class)
        if sop_uid:
            item["00081155"] = _attr("UI", sop_uid)
        if reason == 0:
            assert where is not None
            study, series = where[0], where[1]
            item["00081190"] = _attr(
                "UR", f"{base}/studies/{study}/series/{series}/instances/{sop_uid}")
            referenced.append(item)
        else:
            item["00081197"] = _attr("US", reason)
            failed.append(item)

    def _store_file(self, part: Part, study_param: str | None
                    ) -> tuple[int, str, str, tuple[str, str, str, str] | None]:
        ctype = part.content_type
        if ctype not in ("application/dicom", ""):
            return FAIL_SOP_CLASS_NOT_SUPPORTED, "", "", None
        if part.size < 132:
            return FAIL_CANNOT_UNDERSTAND, "", "", None
        from pydicom.filereader import _read_file_meta_info

        with part.path.open("rb") as f:
            head = f.read(_HEADER_READ)
        if head[128:132] != b"DICM":
            return FAIL_CANNOT_UNDERSTAND, "", "", None
        try:
            bio = io.BytesIO(head)
            bio.seek(132)
            meta = _read_file_meta_info(bio)
            offset = bio.tell()
        except Exception:
            return FAIL_CANNOT_UNDERSTAND, "", "", None
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_raw = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        try:
            validate_uid(sop_class, "SOP Class UID")
            sop_uid = validate_uid(sop_raw, "SOP Instance UID")
            validate_uid(ts, "Transfer Syntax UID")
        except InvalidUIDError as exc:
            LOG.warning("refused a STOW-RS instance: %s", exc)
            return FAIL_CANNOT_UNDERSTAND, _safe(sop_class), _safe(sop_raw), None
        try:
            header = read_header(memoryview(head)[offset:], ts)
            if header.sop_instance_uid is not None and header.sop_instance_uid != sop_uid:
                return FAIL_MISMATCH, sop_class, sop_uid, None
            target = self.spool.instance_path(header.study_uid, header.series_uid, sop_uid)
        except (InvalidInstanceError, InvalidUIDError) as exc:
            LOG.warning("refused a STOW-RS instance: %s", exc)
            return FAIL_CANNOT_UNDERSTAND, sop_class, sop_uid, None
        if study_param is not None and header.study_uid != study_param:
            return FAIL_MISMATCH, sop_class, sop_uid, None
        where = (header.study_uid, header.series_uid, header.patient_id, header.patient_name)
        ok, why = self.disk_guard.check()
        if not ok:
            LOG.error("refused a STOW-RS instance: %s", why)
            return FAIL_OUT_OF_RESOURCES, sop_class, sop_uid, None
        if self.index.has_instance(sop_uid):
            return 0, sop_class, sop_uid, where  # a duplicate is a success
        try:
            size = self.spool.store(target, _file_chunks(part.path))
            self.index.add_instance(InstanceRecord(
                sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_uid=header.study_uid,
                series_uid=header.series_uid, transfer_syntax=ts, calling_ae=CALLING_AE,
                size=size, received_at=time.time(),
                path=str(target.relative_to(self.spool.root)),
                expected_count=header.expected_count,
                called_ae=str(getattr(self.config, "ae_title", "")),
            ))
        except StorageError as exc:
            LOG.error("cannot store a STOW-RS instance: %s", exc)
            return FAIL_OUT_OF_RESOURCES, sop_class, sop_uid, None
        except Exception as exc:
            LOG.error("cannot index a STOW-RS instance: %s", exc)
            return FAIL_OUT_OF_RESOURCES, sop_class, sop_uid, None
        return 0, sop_class, sop_uid, where

    # ---- QIDO-RS ----------------------------------------------------------------------

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
            raise _HTTPError(400, "invalid limit or offset") from None
        return limit, offset

    def _path(self, row: Any) -> Path:
        path = (self.spool.root / row["path"]).resolve()
        if not path.is_relative_to(self.spool.root.resolve()):
            raise _HTTPError(404, "not found")
        return path

    def _study_json(self, study: str, rows: list[Any]) -> dict[str, Any]:
        h = self.headers.get(self._path(rows[0]))
        modalities = sorted({self._series_modality(r) for r in self._series_heads(rows)} - {""})
        out = {
            "00080020": _attr("DA", str(h.get("StudyDate", ""))),
            "00080030": _attr("TM", str(h.get("StudyTime", ""))),
            "00080050": _attr("SH", str(h.get("AccessionNumber", ""))),
            "00080061": _attr("CS", *modalities),
            "00080090": _pn(str(h.get("ReferringPhysicianName", ""))),
            "00100010": _pn(str(h.get("PatientName", ""))),
            "00100020": _attr("LO", str(h.get("PatientID", ""))),
            "00100030": _attr("DA", str(h.get("PatientBirthDate", ""))),
            "00100040": _attr("CS", str(h.get("PatientSex", ""))),
            "0020000D": _attr("UI", study),
            "00200010": _attr("SH", str(h.get("StudyID", ""))),
            "00201206": _attr("IS", len({r["series_uid"] for r in rows})),
            "00201208": _attr("IS", len(rows)),
        }
        if h.get("StudyDescription"):
            out["00081030"] = _attr("LO", str(h["StudyDescription"]))
        return out

    @staticmethod
    def _series_heads(rows: list[Any]) -> list[Any]:
        seen: dict[str, Any] = {}
        for r in rows:
            seen.setdefault(r["series_uid"], r)
        return list(seen.values())

    def _series_modality(self, row: Any) -> str:
        return str(self.headers.get(self._path(row)).get("Modality", ""))

    def _series_json(self, study: str, series: str, rows: list[Any]) -> dict[str, Any]:
        h = self.headers.get(self._path(rows[0]))
        out = {
            "00080060": _attr("CS", str(h.get("Modality", ""))),
            "0020000D": _attr("UI", study),
            "0020000E": _attr("UI", series),
            "00200011": _attr("IS", _int(h.get("SeriesNumber"))),
            "00201209": _attr("IS", len(rows)),
        }
        if h.get("SeriesDescription"):
            out["0008103E"] = _attr("LO", str(h["SeriesDescription"]))
        return out

    def _instance_json(self, row: Any) -> dict[str, Any]:
        h = self.headers.get(self._path(row))
        out = {
            "00080016": _attr("UI", row["sop_class_uid"]),
            "00080018": _attr("UI", row["sop_instance_uid"]),
            "00080060": _attr("CS", str(h.get("Modality", ""))),
            "00020010": _attr("UI", row["transfer_syntax"]),
            "0020000D": _attr("UI", row["study_uid"]),
            "0020000E": _attr("UI", row["series_uid"]),
            "00200013": _attr("IS", _int(h.get("InstanceNumber"))),
        }
        for kw, tag, vr in (("Rows", "00280010", "US"), ("Columns", "00280011", "US"),
                            ("NumberOfFrames", "00280008", "IS")):
            if h.get(kw) is not None:
                out[tag] = _attr(vr, _int(h[kw]))
        return out

    def _rows(self, study: str | None = None, series: str | None = None) -> list[Any]:
        sql = "SELECT * FROM instances"
        cond, params = [], []
        if study:
            cond.append("study_uid = ?")
            params.append(study)
        if series:
            cond.append("series_uid = ?")
            params.append(series)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        return self.index.query(sql + " ORDER BY id", tuple(params))

    def qido_studies(self, request: Request) -> list[dict[str, Any]]:
        f = self._filters(request)
        limit, offset = self._paging(request)
        by_study: dict[str, list[Any]] = {}
        study = f.get("StudyInstanceUID")
        for r in self._rows(study=study):
            by_study.setdefault(r["study_uid"], []).append(r)
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
        by_series: dict[tuple[str, str], list[Any]] = {}
        for r in self._rows(study=study, series=f.get("SeriesInstanceUID")):
            by_series.setdefault((r["study_uid"], r["series_uid"]), []).append(r)
        out = []
        for (st, se), rows in by_series.items():
            js = self._series_json(st, se, rows)
            if "Modality" in f and not _match(f["Modality"], js["00080060"]):
                continue
            if "PatientID" in f and not _match(
                    f["PatientID"], _attr("LO", str(self.headers.get(self._path(rows[0]))
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
            if "SOPInstanceUID" in f and r["sop_instance_uid"] != f["SOPInstanceUID"]:
                continue
            js = self._instance_json(r)
            if "Modality" in f and not _match(f["Modality"], js["00080060"]):
                continue
            out.append(js)
        return _page(out, limit, offset)

    # ---- WADO-RS ----------------------------------------------------------------------

    def instance_rows(self, study: str, series: str | None = None,
                      sop: str | None = None) -> list[Any]:
        if sop is not None:
            rows = self.index.query(
                "SELECT * FROM instances WHERE sop_instance_uid = ? AND study_uid = ?"
                " AND series_uid = ?", (sop, study, series))
        else:
            rows = self._rows(study=study, series=series)
        if not rows:
            raise _HTTPError(404, "not found")
        return rows

    def metadata(self, row: Any, base: str) -> dict[str, Any]:
        import pydicom

        path = self._path(row)
        ds = pydicom.dcmread(path, defer_size=4096)
        prefix = (f"{base}/studies/{row['study_uid']}/series/{row['series_uid']}"
                  f"/instances/{row['sop_instance_uid']}")
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

    def bulkdata(self, row: Any, tag: int) -> bytes:
        import pydicom

        ds = pydicom.dcmread(self._path(row))
        if tag not in ds:
            raise _HTTPError(404, "not found")
        value = ds[tag].value
        if not isinstance(value, bytes | bytearray):
            raise _HTTPError(404, "not found")
        return bytes(value)

    def frames(self, row: Any, numbers: list[int]) -> list[bytes]:
        import pydicom
        from pydicom.encaps import generate_frames

        ds = pydicom.dcmread(self._path(row))
        if "PixelData" not in ds:
            raise _HTTPError(404, "not found")
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if any(k < 1 or k > n for k in numbers):
            raise _HTTPError(404, "no such frame")
        ts = ds.file_meta.TransferSyntaxUID
        data = ds.PixelData
        if ts.is_compressed:
            frames = list(generate_frames(data, number_of_frames=n))
            return [frames[k - 1] for k in numbers]
        if not ts.is_little_endian:
            raise _HTTPError(406, "big-endian pixel data is not served")
        bits = int(ds.BitsAllocated)
        per = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        if bits == 1:
            import numpy as np

            allbits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            return [np.packbits(allbits[(k - 1) * per : k * per], bitorder="little").tobytes()
                    for k in numbers]
        size = per * bits // 8
        return [bytes(data[(k - 1) * size : k * size]) for k in numbers]


# -- small helpers ------------------------------------------------------------------------------

def _int(v: Any) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _safe(uid: str) -> str:
    """A UID echoed back in a response only when it is valid."""
    try:
        return validate_uid(uid)
    except InvalidUIDError:
        return ""


def _match(pattern: str, attr: dict[str, Any]) -> bool:
    import fnmatch

    values = attr.get("Value", [])
    patterns = [p for p in pattern.split(",") if p]
    return any(fnmatch.fnmatchcase(str(v), p) for v in values for p in patterns)


def _page(items: list[Any], limit: int, offset: int) -> list[Any]:
    items = items[offset:]
    return items[:limit] if limit else items


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _base_url(request: Request) -> str:
    """The DICOMweb root as the client sees it, e.g. http://host:port/dicom-web.

    ``public_url`` (make_app) wins. Otherwise the Host header; some clients
    (dicomweb-client) leave the port out of it, so when Host has no port and the
    server listens on a port other than the scheme's default, that port is added.
    """
    public = getattr(request.app.state, "public_url", None) if hasattr(request, "app") else None
    if public:
        return str(public).rstrip("/")
    scheme = request.url.scheme
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if not host:
        if server is None:
            return "/dicom-web"
        host = f"{server[0]}:{server[1]}"
    elif not host.endswith("]") and ":" not in host.rsplit("]", 1)[-1] and server:
        default = 443 if scheme == "https" else 80
        if server[1] and int(server[1]) != default:
            host = f"{host}:{server[1]}"
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{scheme}://{host}{root}/dicom-web"


def _error(status: int, reason: str) -> Response:
    return PlainTextResponse(reason, status)


def _json(data: Any) -> Response:
    if not data:
        return Response(status_code=204)
    return JSONResponse(data, media_type=DICOM_JSON)


def _multipart(parts: list[tuple[Path | bytes, str]], media: str) -> StreamingResponse:
    boundary = secrets.token_hex(16)

    def gen() -> Iterator[bytes]:
        for item, ctype in parts:
            yield (f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n").encode()
            if isinstance(item, bytes):
                yield item
            else:
                yield from _file_chunks(item)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        iterate_in_threadpool(gen()),
        media_type=f'multipart/related; type="{media}"; boundary={boundary}',
    )


def make_app(config: Any, spool: Spool, index: Index, *,
             tokens: dict[str, str] | None = None,
             limits: WebLimits | None = None, public_url: str | None = None,
             audit: Audit | None = None, sessions: Any = None) -> ASGIApp:
    """The DICOMweb ASGI application (routes under /dicom-web).

    ``public_url``: the DICOMweb root clients reach (e.g. behind a reverse proxy,
    ``https://node.example.org/dicom-web``) for the URLs in responses; by default it is
    derived from each request. ``sessions``: browser sessions accepted for reads besides
    the bearer tokens (:mod:`dicomnode.web.session`).
    """
    web = DicomWeb(config, spool, index, limits or WebLimits(), audit)

    def guarded(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except _HTTPError as exc:
                return _error(exc.status, exc.reason)
            except Exception:
                LOG.exception("DICOMweb request failed: %s", request.url.path)
                return _error(500, "internal error")
        return endpoint

    def p(request: Request, name: str, what: str) -> str:
        return _uid_or_404(request.path_params[name], what)

    async def studies_get(request: Request) -> Response:
        return _json(await run_in_threadpool(web.qido_studies, request))

    async def series_get(request: Request) -> Response:
        study = p(request, "study", "study")
        return _json(await run_in_threadpool(web.qido_series, request, study))

    async def all_series_get(request: Request) -> Response:
        return _json(await run_in_threadpool(web.qido_series, request, None))

    async def instances_get(request: Request) -> Response:
        study = p(request, "study", "study")
        series = (p(request, "series", "series")
                  if "series" in request.path_params else None)
        return _json(await run_in_threadpool(web.qido_instances, request, study, series))

    async def all_instances_get(request: Request) -> Response:
        return _json(await run_in_threadpool(web.qido_instances, request, None, None))

    def _ids(request: Request) -> tuple[str, str | None, str | None]:
        study = p(request, "study", "study")
        series = p(request, "series", "series") if "series" in request.path_params else None
        sop = p(request, "sop", "instance") if "sop" in request.path_params else None
        return study, series, sop

    async def retrieve(request: Request) -> Response:
        study, series, sop = _ids(request)
        rows = await run_in_threadpool(web.instance_rows, study, series, sop)
        return _multipart([(web._path(r), "application/dicom") for r in rows],
                          "application/dicom")

    async def metadata(request: Request) -> Response:
        study, series, sop = _ids(request)
        base = _base_url(request)
        rows = await run_in_threadpool(web.instance_rows, study, series, sop)

        def build() -> list[dict[str, Any]]:
            return [web.metadata(r, base) for r in rows]
        return JSONResponse(await run_in_threadpool(build), media_type=DICOM_JSON)

    async def frames(request: Request) -> Response:
        study, series, sop = _ids(request)
        try:
            numbers = [int(x) for x in request.path_params["frames"].split(",") if x.strip()]
        except ValueError:
            raise _HTTPError(400, "invalid frame list") from None
        if not numbers or len(numbers) > 10000:
            raise _HTTPError(400, "invalid frame list")
        rows = await run_in_threadpool(web.instance_rows, study, series, sop)
        data = await run_in_threadpool(web.frames, rows[0], numbers)
        return _multipart([(d, "application/octet-stream") for d in data],
                          "application/octet-stream")

    async def bulkdata(request: Request) -> Response:
        study, series, sop = _ids(request)
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError:
            raise _HTTPError(404, "not found") from None
        rows = await run_in_threadpool(web.instance_rows, study, series, sop)
        data = await run_in_threadpool(web.bulkdata, rows[0], tag)
        return _multipart([(data, "application/octet-stream")], "application/octet-stream")

    async def stow(request: Request) -> Response:
        return await web.stow(request)

    S = "/dicom-web/studies"
    INST = S + "/{study}/series/{series}/instances/{sop}"
    routes = [
        Route(S, guarded(stow), methods=["POST"]),
        Route(S + "/{study}", guarded(stow), methods=["POST"]),
        Route(S, guarded(studies_get), methods=["GET"]),
        Route("/dicom-web/series", guarded(all_series_get), methods=["GET"]),
        Route("/dicom-web/instances", guarded(all_instances_get), methods=["GET"]),
        Route(S + "/{study}", guarded(retrieve), methods=["GET"]),
        Route(S + "/{study}/metadata", guarded(metadata), methods=["GET"]),
        Route(S + "/{study}/series", guarded(series_get), methods=["GET"]),
        Route(S + "/{study}/instances", guarded(instances_get), methods=["GET"]),
        Route(S + "/{study}/series/{series}", guarded(retrieve), methods=["GET"]),
        Route(S + "/{study}/series/{series}/metadata", guarded(metadata), methods=["GET"]),
        Route(S + "/{study}/series/{series}/instances", guarded(instances_get), methods=["GET"]),
        Route(INST, guarded(retrieve), methods=["GET"]),
        Route(INST + "/metadata", guarded(metadata), methods=["GET"]),
        Route(INST + "/frames/{frames}", guarded(frames), methods=["GET"]),
        Route(INST + "/bulkdata/{tag}", guarded(bulkdata), methods=["GET"]),
    ]
    star = Starlette(routes=routes)
    star.state.public_url = public_url
    app: ASGIApp = star
    if tokens:
        app = BearerAuth(app, tokens, sessions)
    return app


# -- serving -------------------------------------------------------------------------------------

class ServerHandle:
    """A uvicorn server running in a background thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)


def serve_in_thread(app: ASGIApp, host: str, port: int,
                    ssl: dict[str, Any] | None = None, *, timeout: float = 15.0) -> ServerHandle:
    """Start ``app`` with uvicorn in a daemon thread; returns once it listens.

    ``port`` 0 picks a free port (``handle.port``). ``ssl``: uvicorn's TLS options,
    e.g. ``{"ssl_certfile": ..., "ssl_keyfile": ..., "ssl_ca_certs": ...,
    "ssl_cert_reqs": ssl.CERT_REQUIRED}``.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            access_log=False, server_header=False, **(ssl or {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dicomweb-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the DICOMweb server did not start on {host}:{port}")
        time.sleep(0.01)
    return ServerHandle(server, thread)


__all__ = ["make_app", "serve_in_thread", "hash_token", "ServerHandle", "WebLimits",
           "BearerAuth", "MultipartError"]
