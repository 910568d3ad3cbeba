"""The node's HTTP API for remote workers (``dicomnode worker``), mounted at ``/workers/v1``.

Every request needs ``Authorization: Bearer <worker token>`` (``queue.worker_tokens``,
stored as SHA-256; a DICOMweb token is not accepted here, nor a worker token on
DICOMweb). A refused request gets 401 with a JSON body that says why, and is audited
(User Authentication, at most once a minute per address). Requests about a job name the
lease holder in ``X-Dicomnode-Owner`` and the worker in ``X-Dicomnode-Worker``.

=======  ===============================  =============================================
method   path                             what
=======  ===============================  =============================================
POST     /heartbeat                       a worker is alive (JSON in, JSON out)
POST     /jobs/{id}/claim                 lease the job a broker message named
POST     /jobs/{id}/extend                extend the lease
POST     /jobs/{id}/fail                  the model could not run (``{"error": ...}``)
GET      /jobs/{id}/input?codec=raw       the de-identified volume (wire format, streamed)
PUT      /jobs/{id}/result                the label map + measurements (wire format)
=======  ===============================  =============================================

Answers are JSON (``{"error": reason, "state": job state}`` for errors): 404 no such job,
409 the job is not this worker's to run (drop the message), 410 its study is gone (the
job failed), 422 the series or the result is unusable (the job failed or backs off).
Errors never carry a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.worker import wire
from dicomnode.worker.checks import Expected
from dicomnode.worker.handback import RemoteJobError, RemoteJobs

LOG = logging.getLogger(__name__)

PREFIX = "/workers/v1"
OWNER_HEADER = "x-dicomnode-owner"
WORKER_HEADER = "x-dicomnode-worker"
_IDENT = re.compile(r"^[\x21-\x7e]{1,200}$")
REFUSAL_AUDIT_INTERVAL = 60.0


class WorkerAuth:
    """ASGI middleware: a known worker token, or 401 with a reason (audited, rate-limited)."""

    def __init__(self, app: ASGIApp, hashes: list[str], audit: Audit) -> None:
        self.app = app
        self.hashes = [bytes.fromhex(h.strip().lower()) for h in hashes]
        self.audit = audit
        self._last_audit: dict[str, float] = {}
        self._lock = threading.Lock()

    def _check(self, scope: Scope) -> str | None:
        if not self.hashes:
            return "this node accepts no worker tokens (queue.worker_tokens is empty)"
        value = ""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                value = v.decode("latin-1")
                break
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "a worker token is required (Authorization: Bearer <token>)"
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for h in self.hashes:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(digest, h)
        return None if ok else "the worker token is not accepted by this node (check worker.token)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reason = self._check(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else ""
        LOG.warning("worker API request from %s refused: %s", address or "?", reason)
        self._audit(address, reason)
        resp = JSONResponse({"error": reason}, 401,
                            headers={"WWW-Authenticate": 'Bearer realm="dicomnode-workers"'})
        await resp(scope, receive, send)

    def _audit(self, address: str, reason: str) -> None:
        from dicomnode.audit import worker_events

        now = time.monotonic()
        with self._lock:
            if now - self._last_audit.get(address, -1e9) < REFUSAL_AUDIT_INTERVAL:
                return
            if len(self._last_audit) > 1000:
                self._last_audit.clear()
            self._last_audit[address] = now
        self.audit.record(worker_events.worker_refused, address or None, reason)


def _error(status: int, reason: str, state: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": reason}
    if state is not None:
        body["state"] = state
    return JSONResponse(body, status)


def _who(request: Request) -> tuple[str, str]:
    owner = request.headers.get(OWNER_HEADER, "")
    worker = request.headers.get(WORKER_HEADER, "")
    if not _IDENT.match(owner) or not _IDENT.match(worker):
        raise RemoteJobError(400, f"the {OWNER_HEADER} and {WORKER_HEADER} headers are required"
                             " (1-200 printable characters)")
    return owner, worker


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > 1 << 20:
        raise RemoteJobError(413, "request too large")
    import json

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise RemoteJobError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise RemoteJobError(400, "a JSON object is expected")
    return data


def make_worker_api(service: RemoteJobs, token_hashes: list[str],
                    audit: Audit | None = None) -> ASGIApp:
    """The worker API as an ASGI app (mount it at :data:`PREFIX`)."""
    audit = audit or NullAudit()

    def guarded(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response: Response = await fn(request)
                return response
            except RemoteJobError as exc:
                if exc.status >= 500:
                    LOG.error("worker API: %s", exc.reason)
                return _error(exc.status, exc.reason, exc.state)
            except ClientDisconnect:
                LOG.warning("worker API: the worker went away mid-request (%s)", request.url.path)
                return _error(400, "incomplete request")
            except Exception:
                LOG.exception("worker API request failed: %s", request.url.path)
                return _error(500, "internal error")
        return endpoint

    async def heartbeat(request: Request) -> Response:
        beat = await _json(request)
        return JSONResponse(await run_in_threadpool(service.heartbeat, beat, _address(request)))

    async def claim(request: Request) -> Response:
        owner, worker = _who(request)
        job_id = int(request.path_params["job"])
        return JSONResponse(await run_in_threadpool(service.claim, job_id, owner, worker))

    async def extend(request: Request) -> Response:
        owner, _worker = _who(request)
        job_id = int(request.path_params["job"])
        return JSONResponse(await run_in_threadpool(service.extend, job_id, owner))

    async def fail(request: Request) -> Response:
        owner, worker = _who(request)
        job_id = int(request.path_params["job"])
        error = (await _json(request)).get("error")
        if not isinstance(error, str) or not error.strip():
            raise RemoteJobError(400, "error: a non-empty string is expected")
        LOG.warning("job %d: worker %s could not run it: %s", job_id, worker, error[:500])
        return JSONResponse(await run_in_threadpool(service.fail, job_id, owner, error))

    async def job_input(request: Request) -> Response:
        owner, worker = _who(request)
        job_id = int(request.path_params["job"])
        codec = request.query_params.get("codec", "raw")
        if codec not in wire.CODECS:
            raise RemoteJobError(400, f"codec: one of {', '.join(wire.CODECS)}")
        header, array = await run_in_threadpool(service.input, job_id, owner, worker,
                                                _address(request))
        stream = wire.encode(header, array, codec)  # type: ignore[arg-type]
        return StreamingResponse(iterate_in_threadpool(stream), media_type=wire.CONTENT_TYPE)

    async def result(request: Request) -> Response:
        owner, worker = _who(request)
        job_id = int(request.path_params["job"])
        if request.headers.get("content-type", "").split(";")[0].strip() != wire.CONTENT_TYPE:
            raise RemoteJobError(415, f"Content-Type must be {wire.CONTENT_TYPE}")
        expected = await run_in_threadpool(service.begin_result, job_id, owner)
        if not isinstance(expected, Expected):
            return JSONResponse(expected)  # already done: nothing more to read
        decoder = wire.Decoder(wire.LABELS_FORMAT, (wire.LABELS_DTYPE,), expected.max_bytes)
        started = time.perf_counter()
        try:
            async for chunk in request.stream():
                decoder.feed(chunk)
            header, labels = decoder.finish()
        except wire.WireError as exc:
            LOG.warning("job %d: unreadable result from worker %s: %s", job_id, worker, exc)
            raise RemoteJobError(400, f"unreadable result: {exc}") from None
        outcome = await run_in_threadpool(service.finish_result, expected, owner, worker,
                                          header, labels, time.perf_counter() - started)
        return JSONResponse(outcome)

    J = "/jobs/{job:int}"
    app = Starlette(routes=[
        Route("/heartbeat", guarded(heartbeat), methods=["POST"]),
        Route(J + "/claim", guarded(claim), methods=["POST"]),
        Route(J + "/extend", guarded(extend), methods=["POST"]),
        Route(J + "/fail", guarded(fail), methods=["POST"]),
        Route(J + "/input", guarded(job_input), methods=["GET"]),
        Route(J + "/result", guarded(result), methods=["PUT"]),
    ])
    return WorkerAuth(app, token_hashes, audit)
