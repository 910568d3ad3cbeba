"""Who may ask the node's HTTP side what: bearer tokens (RFC 6750) and the Host header.

Tokens are configured as the SHA-256 of the token (``hash_token``), never in clear;
a request without a known token gets the same 401 whatever the path, and the
comparison takes the same time whichever token matched.

:class:`HostGuard` answers 400 to a request whose Host header (RFC 9110 7.2) names no
host the node answers to: a web page that rebinds its own DNS name to 127.0.0.1 (DNS
rebinding) reaches a loopback port from the user's browser, but its requests still
carry its own name, so it cannot read what the node serves. It also keeps foreign
names out of the URLs the node writes into responses (BulkDataURI, RetrieveURL).

A browser cannot send the header; it signs in once at ``/login`` with a token and then
carries a session cookie (:mod:`dicomnode.web.session`: random id, HttpOnly,
SameSite=Strict, Secure under HTTPS), accepted for reads (GET/HEAD) only. The status
page and DICOMweb ask the same question (:meth:`Gate.allows`), so the page never shows a
caller what DICOMweb would refuse it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def hash_token(token: str) -> str:
    """The sha256 hex digest stored in the config for a bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return str(v.decode("latin-1"))
    return None


class Tokens:
    """A set of accepted bearer tokens, by their SHA-256 hex digests."""

    def __init__(self, hashes: Iterable[str]) -> None:
        self.hashes = [bytes.fromhex(h.strip().lower()) for h in hashes]

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def accept(self, scope: Scope) -> bool:
        """Whether the request carries one of the tokens (constant time in which)."""
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for h in self.hashes:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(digest, h)
        return ok


def unauthorized() -> PlainTextResponse:
    """The one 401 answer (same body for every path)."""
    return PlainTextResponse(
        "Unauthorized", 401, headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'})


class Gate:
    """Who may read: a known bearer token, or (GET/HEAD only) a live session of
    ``sessions`` (:class:`dicomnode.web.session.SessionStore`)."""

    def __init__(self, tokens: dict[str, str], sessions: Any = None) -> None:
        self.tokens = Tokens(tokens.values())
        self.sessions = sessions

    def allows(self, scope: Scope) -> bool:
        """Whether the request carries a known bearer token, or (reads only) a live
        session."""
        if self.sessions is not None and self.sessions.allows(scope):
            return True
        return self.tokens.accept(scope)


class BearerAuth(Gate):
    """ASGI middleware: 401 (same body for every path) unless :meth:`Gate.allows`."""

    def __init__(self, app: ASGIApp, tokens: dict[str, str], sessions: Any = None) -> None:
        super().__init__(tokens, sessions)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allows(scope):
            await unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_name(value: str) -> str:
    """The host of a Host header value, lower case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` (from :func:`host_name`) matches a name, ``*.domain`` or ``*``."""
    for name in allowed:
        if name == "*" or host == name:
            return True
        if name.startswith("*.") and host.endswith(name[1:]) and len(host) > len(name) - 1:
            return True
    return False


class HostGuard:
    """ASGI middleware: 400 for a Host header that names no host the node answers to.

    ``open_paths`` (the health probes, which carry nothing worth a rebinding and are
    asked by orchestrators under whatever address they use) are not checked. A request
    without a Host header (HTTP/1.0) passes: browsers always send one.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str],
                 open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = tuple(a.lower() for a in allowed)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.open_paths:
            value = _header(scope, b"host")
            if value is not None and not host_allowed(host_name(value), self.allowed):
                await PlainTextResponse("invalid Host header", 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
