"""Bearer-token authentication for the node's HTTP side (RFC 6750).

Tokens are configured as the SHA-256 of the token (``hash_token``), never in clear;
a request without a known token gets the same 401 whatever the path, and the
comparison takes the same time whichever token matched."""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def hash_token(token: str) -> str:
    """The sha256 hex digest stored in the config for a bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BearerAuth:
    """ASGI middleware: 401 (same body for every path) unless a known bearer token is sent."""

    def __init__(self, app: ASGIApp, tokens: dict[str, str]) -> None:
        self.app = app
        self.hashes = [bytes.fromhex(h.strip().lower()) for h in tokens.values()]

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._ok(scope):
            resp = PlainTextResponse(
                "Unauthorized", 401, headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'}
            )
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
