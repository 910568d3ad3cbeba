"""The read side of DICOMweb (PS3.18): the QIDO-RS and WADO-RS routes, rendered
images and thumbnails included.

:func:`read_routes` gives the routes under ``/dicom-web`` that search and retrieve
what the node holds; the node's HTTP application (:mod:`dicomnode.http`) mounts them
beside the STOW-RS door and behind the bearer-token check. Every route answers an
:class:`~dicomnode.core.dicomweb.HTTPError` with its status and a short reason, and
anything unexpected with a 500 that carries no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicomnode.core.dicomweb import (
    DICOM_JSON,
    HTTPError,
    base_url,
    error,
    multipart,
    uid_or_404,
)
from dicomnode.core.index import Index
from dicomnode.core.layout import StorageLayout
from dicomnode.web.qido import Qido, QidoAnswer
from dicomnode.web.render import RenderOptions
from dicomnode.web.renderings import Renderings
from dicomnode.web.wado import Wado

LOG = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

STUDIES = "/dicom-web/studies"
INSTANCE = STUDIES + "/{study}/series/{series}/instances/{sop}"


def guarded(fn: Endpoint) -> Endpoint:
    """``fn`` with its errors turned into responses: HTTPError -> its status, anything
    else -> 500 with no detail (logged with the traceback)."""
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as exc:
            return error(exc.status, exc.reason)
        except Exception:
            LOG.exception("DICOMweb request failed: %s", request.url.path)
            return error(500, "internal error")
    return endpoint


def qido_response(answer: QidoAnswer) -> Response:
    """A QIDO-RS answer: DICOM JSON (204 when nothing matches), with its warnings."""
    headers = {"Warning": ", ".join(answer.warnings)} if answer.warnings else None
    if not answer.items:
        return Response(status_code=204, headers=headers)
    return JSONResponse(answer.items, media_type=DICOM_JSON, headers=headers)


def read_routes(index: Index, layout: StorageLayout) -> list[Route]:
    """The QIDO-RS and WADO-RS routes over ``index`` and the storage folder."""
    qido = Qido(index)
    wado = Wado(index, layout)

    def p(request: Request, name: str, what: str) -> str:
        return uid_or_404(request.path_params[name], what)

    def ids(request: Request) -> tuple[str, str | None, str | None]:
        study = p(request, "study", "study")
        series = p(request, "series", "series") if "series" in request.path_params else None
        sop = p(request, "sop", "instance") if "sop" in request.path_params else None
        return study, series, sop

    def frame_numbers(request: Request) -> list[int]:
        try:
            numbers = [int(x) for x in request.path_params["frames"].split(",") if x.strip()]
        except ValueError:
            raise HTTPError(400, "invalid frame list") from None
        if not numbers or len(numbers) > 10000:
            raise HTTPError(400, "invalid frame list")
        return numbers

    async def studies_get(request: Request) -> Response:
        return qido_response(await run_in_threadpool(qido.search, request, "study"))

    async def series_get(request: Request) -> Response:
        study = p(request, "study", "study") if "study" in request.path_params else None
        return qido_response(await run_in_threadpool(qido.search, request, "series", study))

    async def instances_get(request: Request) -> Response:
        study = p(request, "study", "study") if "study" in request.path_params else None
        series = p(request, "series", "series") if "series" in request.path_params else None
        return qido_response(
            await run_in_threadpool(qido.search, request, "instance", study, series))

    async def retrieve(request: Request) -> Response:
        study, series, sop = ids(request)
        rows = await run_in_threadpool(wado.instance_rows, study, series, sop)
        return multipart([(wado.path(r), "application/dicom") for r in rows],
                         "application/dicom")

    async def metadata(request: Request) -> Response:
        study, series, sop = ids(request)
        base = base_url(request)
        rows = await run_in_threadpool(wado.instance_rows, study, series, sop)

        def build() -> list[dict[str, Any]]:
            return [wado.metadata(r, base) for r in rows]
        return JSONResponse(await run_in_threadpool(build), media_type=DICOM_JSON)

    async def frames(request: Request) -> Response:
        study, series, sop = ids(request)
        numbers = frame_numbers(request)
        rows = await run_in_threadpool(wado.instance_rows, study, series, sop)
        data, media, syntax = await run_in_threadpool(
            wado.frames, rows[0], numbers, request.headers.get("accept"))
        part = f"{media}; transfer-syntax={syntax}"
        return multipart([(d, part) for d in data], media, transfer_syntax=syntax)

    async def bulkdata(request: Request) -> Response:
        study, series, sop = ids(request)
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError:
            raise HTTPError(404, "not found") from None
        rows = await run_in_threadpool(wado.instance_rows, study, series, sop)
        data = await run_in_threadpool(wado.bulkdata, rows[0], tag)
        return multipart([(data, "application/octet-stream")], "application/octet-stream")

    def rendering(thumbnail: bool) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            study, series, sop = ids(request)
            opts = RenderOptions.from_request(request.query_params,
                                              request.headers.get("accept"),
                                              thumbnail=thumbnail)
            numbers = frame_numbers(request) if "frames" in request.path_params else None
            images = await run_in_threadpool(
                renderings.render, study, series, sop, numbers, opts, thumbnail)
            headers = {"Cache-Control": "private, max-age=300"}
            if len(images) == 1:
                return Response(images[0], media_type=opts.media, headers=headers)
            return multipart([(img, opts.media) for img in images], opts.media,
                             headers=headers)
        return endpoint

    renderings = Renderings(index, wado)
    rendered, thumbnail = rendering(False), rendering(True)
    S, INST = STUDIES, INSTANCE
    return [
        Route(S, guarded(studies_get), methods=["GET"]),
        Route("/dicom-web/series", guarded(series_get), methods=["GET"]),
        Route("/dicom-web/instances", guarded(instances_get), methods=["GET"]),
        Route(S + "/{study}", guarded(retrieve), methods=["GET"]),
        Route(S + "/{study}/metadata", guarded(metadata), methods=["GET"]),
        Route(S + "/{study}/rendered", guarded(rendered), methods=["GET"]),
        Route(S + "/{study}/thumbnail", guarded(thumbnail), methods=["GET"]),
        Route(S + "/{study}/series", guarded(series_get), methods=["GET"]),
        Route(S + "/{study}/instances", guarded(instances_get), methods=["GET"]),
        Route(S + "/{study}/series/{series}", guarded(retrieve), methods=["GET"]),
        Route(S + "/{study}/series/{series}/metadata", guarded(metadata), methods=["GET"]),
        Route(S + "/{study}/series/{series}/rendered", guarded(rendered), methods=["GET"]),
        Route(S + "/{study}/series/{series}/thumbnail", guarded(thumbnail), methods=["GET"]),
        Route(S + "/{study}/series/{series}/instances", guarded(instances_get),
              methods=["GET"]),
        Route(INST, guarded(retrieve), methods=["GET"]),
        Route(INST + "/metadata", guarded(metadata), methods=["GET"]),
        Route(INST + "/rendered", guarded(rendered), methods=["GET"]),
        Route(INST + "/thumbnail", guarded(thumbnail), methods=["GET"]),
        Route(INST + "/frames/{frames}", guarded(frames), methods=["GET"]),
        Route(INST + "/frames/{frames}/rendered", guarded(rendered), methods=["GET"]),
        Route(INST + "/frames/{frames}/thumbnail", guarded(thumbnail), methods=["GET"]),
        Route(INST + "/bulkdata/{tag}", guarded(bulkdata), methods=["GET"]),
    ]
