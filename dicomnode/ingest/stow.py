"""The DICOMweb front door: STOW-RS (PS3.18 10.5), beside the DIMSE SCP.

Each part of a ``multipart/related; type="application/dicom"`` request is streamed to
a temp file in the spool's ``tmp/`` folder (:mod:`dicomnode.ingest.multipart`), then
handed to the same :class:`~dicomnode.ingest.admission.Admission` as a C-STORE: the
same checks, the same durability (the part is adopted by rename: fdatasync, rename,
folder fsync, no copy), the same index row, and the same audit event per study. Only
the translation differs: each outcome becomes an item of the response's Referenced
SOP Sequence (stored) or Failed SOP Sequence (with its Failure Reason, PS3.18 Table
10.5.3-1), and the response is 200 (all stored), 202 (some) or 409 (none).

Fail closed: while the audit trail cannot be written or the disk is below the guard a
request is answered 503 (with Retry-After) before its body is read, and the disk guard
is asked again before each part and every 16 MiB of it, so one upload cannot fill the
disk past the guard; a request cut short that way fails what it had not stored with
0xA700, and is answered 503 when it stored nothing.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from dicomnode.core.dicomweb import DICOM_JSON, attr, base_url, error, uid_or_404
from dicomnode.core.status import Status, http_status_of_store
from dicomnode.ingest.admission import Admission, AdmissionSession, Arrival
from dicomnode.ingest.multipart import MultipartError, MultipartParser, Part, boundary_from

LOG = logging.getLogger(__name__)

#: The calling AE title recorded for instances that arrive over STOW-RS.
CALLING_AE = "STOW-RS"
_HEADER_READ = 8 << 20  # the header attributes ingest needs lie within this


@dataclass(frozen=True)
class StowLimits:
    """Bounds of one STOW-RS request."""

    max_request_bytes: int = 8 << 30
    max_part_bytes: int = 2 << 30
    max_parts: int = 20000


class StowRs:
    """Stores the instances of STOW-RS requests through an :class:`Admission`."""

    def __init__(self, admission: Admission, limits: StowLimits | None = None) -> None:
        self.admission = admission
        self.limits = limits or StowLimits()

    async def stow(self, request: Request) -> Response:
        study_param = request.path_params.get("study")
        if study_param is not None:
            study_param = uid_or_404(study_param, "study")
        try:
            boundary = boundary_from(request.headers.get("content-type", ""))
        except MultipartError as exc:
            LOG.warning("STOW-RS request refused: %s", exc.reason)
            return error(exc.status, exc.reason)
        ok, why = self.admission.health()
        if not ok:
            LOG.error("STOW-RS request refused: %s", why)
            return Response("cannot store now; try again later", 503,
                            headers={"Retry-After": "30"}, media_type="text/plain")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.limits.max_request_bytes:
                    return error(413, "request too large")
            except ValueError:
                return error(400, "invalid Content-Length")
        parser = MultipartParser(
            boundary, self.admission.spool.tmp, max_part_bytes=self.limits.max_part_bytes,
            max_parts=self.limits.max_parts,
            room=lambda: self.admission.disk_guard.check(fresh=True),
        )
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        base = base_url(request)
        received = 0
        pending: list[Part] = []
        address = request.client.host if request.client else ""
        session = self.admission.session(CALLING_AE, address)
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
                    await run_in_threadpool(self._store_part, session, part, study_param,
                                            base, referenced, failed)
            parser.finish()
        except MultipartError as exc:
            LOG.warning("STOW-RS request refused: %s", exc.reason)
            if not referenced and not failed:
                return error(exc.status, exc.reason)
            # some instances were already stored: report them, and the rest as failed
            failed.append({"00081197": attr("US", int(
                Status.OUT_OF_RESOURCES if exc.out_of_resources else Status.CANNOT_UNDERSTAND))})
        except ClientDisconnect:
            LOG.warning("STOW-RS client went away mid-upload; its partial part is discarded")
            return error(400, "incomplete request")
        except Exception:
            LOG.exception("STOW-RS request failed")
            if not referenced and not failed:
                return error(500, "internal error")
            failed.append({"00081197": attr("US", int(Status.PROCESSING_FAILURE))})
        finally:
            for p in pending:
                p.discard()
            parser.close()
            session.close()
        if not referenced and not failed:
            LOG.warning("STOW-RS request refused: no instances in it")
            return error(400, "no instances in the request")
        body: dict[str, Any] = {}
        if study_param:
            body["00081190"] = attr("UR", f"{base}/studies/{study_param}")
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        status = http_status_of_store(len(referenced), len(failed))
        if not referenced and all(_reason(f) == Status.OUT_OF_RESOURCES for f in failed):
            status = 503  # nothing stored, and only for want of resources: try again later
        return JSONResponse(body, status, media_type=DICOM_JSON,
                            headers={"Retry-After": "30"} if status == 503 else None)

    def _store_part(self, session: AdmissionSession, part: Part, study_param: str | None,
                    base: str, referenced: list[dict[str, Any]],
                    failed: list[dict[str, Any]]) -> None:
        try:
            status, sop_class, sop_uid, where = self._admit(session, part, study_param)
        except Exception:
            LOG.exception("unexpected error while storing a STOW-RS part")
            status, sop_class, sop_uid, where = Status.PROCESSING_FAILURE, "", "", None
        finally:
            part.discard()  # a no-op once the part's file was adopted by the spool
        item: dict[str, Any] = {}
        if sop_class:
            item["00081150"] = attr("UI", sop_class)
        if sop_uid:
            item["00081155"] = attr("UI", sop_uid)
        if status == Status.SUCCESS and where is not None:
            study, series = where
            item["00081190"] = attr(
                "UR", f"{base}/studies/{study}/series/{series}/instances/{sop_uid}")
            referenced.append(item)
        else:
            item["00081197"] = attr("US", int(status))
            failed.append(item)

    def _admit(self, session: AdmissionSession, part: Part, study_param: str | None
               ) -> tuple[Status, str, str, tuple[str, str] | None]:
        """Read the part's file meta (PS3.10 7.1) and admit it: the meta says what the
        instance claims to be, the admission checks the data set against it."""
        if part.content_type not in ("application/dicom", ""):
            return Status.SOP_CLASS_NOT_SUPPORTED, "", "", None
        if part.size < 132:
            return Status.CANNOT_UNDERSTAND, "", "", None
        from pydicom.filereader import _read_file_meta_info

        with part.path.open("rb") as f:
            head = f.read(_HEADER_READ)
        if head[128:132] != b"DICM":
            return Status.CANNOT_UNDERSTAND, "", "", None
        try:
            bio = io.BytesIO(head)
            bio.seek(132)
            meta = _read_file_meta_info(bio)
            offset = bio.tell()
        except Exception:
            return Status.CANNOT_UNDERSTAND, "", "", None
        outcome = session.admit(Arrival(
            sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "") or ""),
            sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
            transfer_syntax=str(meta.get("TransferSyntaxUID", "") or ""),
            size=part.size, header_bytes=memoryview(head)[offset:], file=part.path,
            study_uid=study_param,
        ))
        where = None
        if outcome.header is not None:
            where = (outcome.header.study_uid, outcome.header.series_uid)
        return outcome.status, outcome.sop_class_uid, outcome.sop_instance_uid, where


def _reason(item: dict[str, Any]) -> int | None:
    """The Failure Reason (0008,1197) of a Failed SOP Sequence item."""
    values = item.get("00081197", {}).get("Value") or [None]
    return values[0] if isinstance(values[0], int) else None
