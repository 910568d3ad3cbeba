"""DICOMweb helpers shared by the STOW-RS door and the read side (PS3.18): DICOM JSON
responses, the one HTTP error type, and the base URL as the client sees it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from dicomnode.core.uids import check_uid
from dicomnode.errors import InvalidUIDError

DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20


class HTTPError(Exception):
    """An error a DICOMweb endpoint answers with ``status`` and a short ``reason``
    (never a traceback)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def attr(vr: str, *values: Any) -> dict[str, Any]:
    """A DICOM JSON attribute (PS3.18 F.2.2); empty values are left out."""
    vals = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": vals} if vals else {"vr": vr}


def pn(name: str) -> dict[str, Any]:
    """A DICOM JSON Person Name attribute (PS3.18 F.2.2)."""
    return {"vr": "PN", "Value": [{"Alphabetic": name}]} if name else {"vr": "PN"}


def uid_or_404(value: str, what: str) -> str:
    """A UID from the path; anything else is 404 (400 when empty), never a file name."""
    try:
        return check_uid(value, what)
    except InvalidUIDError:
        raise HTTPError(404 if value else 400, f"no such {what}") from None


def int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def base_url(request: Request) -> str:
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


def error(status: int, reason: str) -> Response:
    return PlainTextResponse(reason, status)


def json_response(data: Any) -> Response:
    if not data:
        return Response(status_code=204)
    return JSONResponse(data, media_type=DICOM_JSON)


def multipart(parts: list[tuple[Path | bytes, str]], media: str, *,
              transfer_syntax: str | None = None,
              headers: dict[str, str] | None = None) -> StreamingResponse:
    """A multipart/related response (PS3.18 8.7.1) of files or bytes; with
    ``transfer_syntax``, its ``transfer-syntax`` parameter (PS3.18 8.7.3.5.2)."""
    boundary = secrets.token_hex(16)
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""

    def gen() -> Iterator[bytes]:
        for item, ctype in parts:
            yield (f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n").encode()
            if isinstance(item, bytes):
                yield item
            else:
                yield from file_chunks(item)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        iterate_in_threadpool(gen()),
        media_type=f'multipart/related; type="{media}"{ts}; boundary={boundary}',
        headers=headers,
    )

