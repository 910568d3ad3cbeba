"""Bearer-token authentication for the node's HTTP side (RFC 6750).

Tokens are configured as the SHA-256 of the token (``hash_token``), never in clear;
a request without a known token gets the same 401 whatever the path, and the
comparison takes the same time whichever token matched.

A browser cannot send the header; it signs in once at ``/login`` with a token and then
carries a session cookie (:mod:`dicomnode.web.session`: random id, HttpOnly,
SameSite=Strict, Secure under HTTPS), accepted for reads (GET/HEAD) only. The status
page and DICOMweb ask the same question (:meth:`BearerAuth.allows`), so the page never
shows a caller what DICOMweb would refuse it."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def hash_token(token: str) -> str:
    """The sha256 hex digest stored in the config for a bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Gate:
    """Who may read: a known bearer token, or (GET/HEAD only) a live session of
    ``sessions`` (:class:`dicomnode.web.session.SessionStore`)."""

    def __init__(self, tokens: dict[str, str], sessions: Any = None) -> None:
        self.hashes = [bytes.fromhex(h.strip().lower()) for h in tokens.values()]
        self.sessions = sessions

    def allows(self, scope: Scope) -> bool:
        """Whether the request carries a known bearer token, or (reads only) a live
        session."""
        if self.sessions is not None and self.sessions.allows(scope):
            return True
        return self._ok(scope)

    def _ok(self, scope: Scope) -> bool:
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


class BearerAuth(Gate):
    """ASGI middleware: 401 (same body for every path) unless :meth:`Gate.allows`.

    With ``sessions`` (:class:`dicomnode.web.session.SessionStore`), a read (GET/HEAD)
    carrying a live session cookie of the node's own sign-in page passes too.
    """

    def __init__(self, app: ASGIApp, tokens: dict[str, str], sessions: Any = None) -> None:
        super().__init__(tokens, sessions)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allows(scope):
            resp = PlainTextResponse(
                "Unauthorized", 401, headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'}
            )
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
