"""The node's HTTP front door: DICOMweb under /dicom-web plus /healthz, /readyz
and /metrics for IT's monitoring, and (queue.backend celery) the worker API under
/workers/v1 (dicomnode/web/worker_api.py, worker tokens only).

Health and metrics carry no patient data and answer without a token (liveness and
readiness probes, Prometheus scrapers); DICOMweb needs a bearer token whenever the
config lists any. HTTPS (and client certificates) when the config names them.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from dicomnode.config import NodeConfig
from dicomnode.index import Index
from dicomnode.ingest.spool import Spool
from dicomnode.metrics import Metrics, health_response, liveness_checks, readiness_checks
from dicomnode.web import WebLimits, make_app, serve_in_thread
from dicomnode.web.app import ServerHandle


def build_app(config: NodeConfig, spool: Spool, index: Index, metrics: Metrics,
              databases: list[Path], scheduler: Callable[[], Any],
              audit: Any = None, workers: Any = None) -> Starlette:
    hc = config.http
    tokens = {t.name: t.sha256.lower() for t in hc.tokens} or None
    dicomweb = make_app(
        config, spool, index, tokens=tokens, public_url=hc.public_url, audit=audit,
        limits=WebLimits(max_request_bytes=int(hc.max_request_mb * (1 << 20)),
                         max_part_bytes=int(hc.max_part_mb * (1 << 20))),
    )

    def respond(result: tuple[int, bytes, str]) -> Response:
        status, body, ctype = result
        return Response(body, status_code=status, media_type=ctype)

    async def healthz(request: Request) -> Response:
        return respond(health_response(liveness_checks()))

    async def readyz(request: Request) -> Response:
        checks = readiness_checks(config.storage, databases=databases, scheduler=scheduler)
        return respond(health_response(checks))

    async def metrics_endpoint(request: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    middleware = []
    if hc.cors_origins:  # a viewer (e.g. OHIF) served from another origin
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(hc.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
        ))
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    if workers is not None:  # the worker API (queue.backend celery), its own tokens
        from dicomnode.web.worker_api import PREFIX

        routes.append(Mount(PREFIX, app=workers))
    routes.append(Mount("/", app=dicomweb))
    return Starlette(routes=routes, middleware=middleware)


def start_http(config: NodeConfig, app: Starlette) -> ServerHandle:
    hc = config.http
    tls: dict[str, Any] | None = None
    if hc.certfile is not None:
        tls = {"ssl_certfile": str(hc.certfile), "ssl_keyfile": str(hc.keyfile)}
        if hc.ca_file is not None:
            tls["ssl_ca_certs"] = str(hc.ca_file)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED if hc.require_client_cert \
                else ssl.CERT_OPTIONAL
    return serve_in_thread(app, hc.bind_address, hc.port, tls)
