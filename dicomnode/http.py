"""The node's HTTP front door: DICOMweb under /dicom-web, the status page at /
(:mod:`dicomnode.web.status`), OHIF at /viewer/ (:mod:`dicomnode.web.viewer`), /healthz,
/readyz and /metrics for IT's monitoring, with tokens /login for browsers, and
(queue.backend celery) the worker API under /workers/v1 (:mod:`dicomnode.web.worker_api`,
worker tokens only).

* DICOMweb, the status page and the viewer need a bearer token (or, for a browser, the
  session cookie /login gives for one) whenever the config lists any (and the config
  refuses a non-loopback address without them: :mod:`dicomnode.config.http`).
* ``/healthz`` and ``/readyz`` answer without a token (probes); they carry no patient
  data and name no caller.
* ``/metrics`` needs a token (``http.tokens`` or ``http.metrics_tokens``) whenever any is
  configured; without tokens (the loopback default) it answers, but lists no calling
  AE title.
* Every path but the probes checks the Host header against the names the node answers
  to (loopback names, the bind address, ``public_url``'s host, ``http.allowed_hosts``):
  400 otherwise, so a DNS-rebinding page cannot read from the loopback default, and no
  foreign host reaches the URLs written into responses.
* uvicorn runs with head and body deadlines and a connection cap
  (:mod:`dicomnode.web.protocol`). HTTPS (and client certificates) when the config
  names them; the private key must be owner-only (:func:`dicomnode.core.tls.check_key_file`).
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
from starlette.types import ASGIApp

from dicomnode.audit.recorder import Audit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index
from dicomnode.core.tls import check_key_file
from dicomnode.export.outbox import Outbox
from dicomnode.ingest.admission import Admission
from dicomnode.ingest.diskguard import DiskGuard
from dicomnode.ingest.spool import Spool
from dicomnode.ingest.stow import StowLimits, StowRs
from dicomnode.metrics import Metrics, health_response, liveness_checks, readiness_checks
from dicomnode.queue.base import JobQueue
from dicomnode.web.app import STUDIES, guarded, read_routes
from dicomnode.web.auth import BearerAuth, Gate, HostGuard, Tokens, unauthorized
from dicomnode.web.protocol import ConnectionLimits
from dicomnode.web.server import ServerHandle, serve_in_thread
from dicomnode.web.session import LOGIN_PATH, SessionStore, login_routes
from dicomnode.web.status import StatusPage
from dicomnode.web.viewer import viewer_routes

#: Paths every prober may ask, under any Host name and without a token.
PROBES = ("/healthz", "/readyz")


def make_app(config: NodeConfig, spool: Spool, index: Index, *,
             tokens: dict[str, str] | None = None, limits: StowLimits | None = None,
             public_url: str | None = None, audit: Audit | None = None,
             sessions: SessionStore | None = None) -> ASGIApp:
    """The DICOMweb application (routes under /dicom-web): the STOW-RS door and the
    QIDO-RS/WADO-RS read side, behind the bearer-token check when ``tokens`` (name ->
    sha256 hex) are given.

    ``public_url``: the DICOMweb root clients reach (e.g. behind a reverse proxy,
    ``https://node.example.org/dicom-web``) for the URLs in responses; by default it is
    derived from each request. ``sessions``: browser sessions accepted for reads besides
    the bearer tokens (:mod:`dicomnode.web.session`).
    """
    stow = StowRs(Admission(config, spool, index, audit=audit), limits)
    routes = [Route(STUDIES, guarded(stow.stow), methods=["POST"]),
              Route(STUDIES + "/{study}", guarded(stow.stow), methods=["POST"]),
              *read_routes(index, spool.layout)]
    star = Starlette(routes=routes)
    star.state.public_url = public_url
    app: ASGIApp = star
    if tokens:
        app = BearerAuth(app, tokens, sessions)
    return app


def build_app(config: NodeConfig, spool: Spool, index: Index, metrics: Metrics,
              databases: list[Path], scheduler: Callable[[], Any],
              audit: Audit | None = None, *, queue: JobQueue | None = None,
              outbox: Outbox | None = None, workers: ASGIApp | None = None) -> Starlette:
    """The whole HTTP application. ``queue`` and ``outbox`` (when the node runs models
    and has destinations) feed the status page; ``workers`` is the worker API (queue
    backend celery), mounted under its own prefix with its own tokens."""
    hc = config.http
    tokens = {t.name: t.sha256.lower() for t in hc.tokens} or None
    # browsers (the status page, OHIF at /viewer/) sign in once at /login; the cookie then reads
    sessions = SessionStore(tokens) if tokens else None
    dicomweb = make_app(
        config, spool, index, tokens=tokens, public_url=hc.public_url, audit=audit,
        limits=StowLimits(max_request_bytes=int(hc.max_request_mb * (1 << 20)),
                         max_part_bytes=int(hc.max_part_mb * (1 << 20))),
        sessions=sessions,
    )
    secure = hc.certfile is not None or str(hc.public_url or "").startswith("https:")
    status = StatusPage(config.ae_title, index, spool.root, queue=queue, outbox=outbox,
                        models_dir=config.models_dir,
                        gate=Gate(tokens, sessions) if tokens else None,
                        login_path=LOGIN_PATH if sessions is not None else None)
    pages = [*(login_routes(sessions, secure_cookie=secure) if sessions is not None else []),
             *viewer_routes(hc.viewer_dir, dicomweb_root=hc.public_url, sessions=sessions),
             *status.routes()]

    def respond(result: tuple[int, bytes, str]) -> Response:
        status, body, ctype = result
        return Response(body, status_code=status, media_type=ctype)

    rc = config.retention
    disk = DiskGuard(config.storage, int(rc.min_free_gb * 1e9), rc.min_free_ratio)
    audit_health = audit.health if audit is not None and audit.enabled else None

    async def healthz(request: Request) -> Response:
        return respond(health_response(liveness_checks()))

    async def readyz(request: Request) -> Response:
        checks = readiness_checks(config.storage, databases=databases, scheduler=scheduler,
                                  audit=audit_health, disk=disk.check)
        return respond(health_response(checks))

    metrics_tokens = Tokens(t.sha256 for t in (*hc.tokens, *hc.metrics_tokens))

    async def metrics_endpoint(request: Request) -> Response:
        if metrics_tokens and not metrics_tokens.accept(request.scope):
            return unauthorized()
        body, ctype = metrics.render(callers=bool(metrics_tokens))
        return Response(body, media_type=ctype)

    middleware = [Middleware(HostGuard, allowed=hc.hosts, open_paths=PROBES)]
    if hc.cors_origins:  # a viewer (e.g. OHIF) served from another origin
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(hc.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            allow_credentials=hc.cors_allow_credentials,
        ))
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *pages,
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
        assert hc.keyfile is not None
        check_key_file(hc.keyfile, "http.keyfile")
        tls = {"ssl_certfile": str(hc.certfile), "ssl_keyfile": str(hc.keyfile)}
        if hc.ca_file is not None:
            tls["ssl_ca_certs"] = str(hc.ca_file)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED if hc.require_client_cert \
                else ssl.CERT_OPTIONAL
    limits = ConnectionLimits(hc.header_timeout_seconds, hc.body_timeout_seconds,
                              hc.max_connections)
    return serve_in_thread(app, hc.bind_address, hc.port, tls, limits=limits,
                           keep_alive=hc.keep_alive_seconds)
