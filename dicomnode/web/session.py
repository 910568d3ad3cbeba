"""Browser sessions for the node's own pages (OHIF at /viewer/, the status page).

A browser cannot add ``Authorization: Bearer`` to the requests a web application makes
on its own (OHIF 3's DICOMweb data source only sends what its user-authentication
service, i.e. OIDC, gives it), and a token written into ``app-config.js`` would be
served to anyone who asks for that file. So a person types a configured bearer token
once into ``/login``; the node checks it like a bearer token (its SHA-256 against
``http.tokens``) and sets a session cookie:

* the cookie holds a random 256-bit session id, never the token; the node keeps only
  the id's SHA-256, in memory (a restart logs everybody out);
* ``HttpOnly`` (page scripts cannot read it), ``SameSite=Strict`` (no other site can
  make the browser send it), ``Secure`` under HTTPS, ``Path=/``;
* it expires after ``max_age`` seconds, or ``idle`` seconds without use;
* it is accepted for **reads only** (GET/HEAD: QIDO-RS, WADO-RS, pages). STOW-RS and
  any other write still needs the bearer header, so a forged cross-site form post can
  never store anything.

Same origin, so the browser sends the cookie with every XHR/fetch OHIF makes to
``/dicom-web`` without any OHIF configuration. PS3.18 leaves authentication to the
origin server (8.10 Security Considerations).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

LOG = logging.getLogger(__name__)

COOKIE = "dicomnode_session"
READ_METHODS = frozenset({"GET", "HEAD"})
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
_MAX_FORM_BYTES = 4096


@dataclass
class _Session:
    token_name: str
    created: float
    last_used: float


class SessionStore:
    """Sessions opened by a valid bearer token (see the module docstring).

    ``tokens``: name -> SHA-256 hex of the token, as in the config (``http.tokens``).
    ``clock``: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, tokens: dict[str, str], *, max_age: float = 12 * 3600,
                 idle: float = 3600, max_sessions: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tokens:
            raise ValueError("tokens: a session store needs at least one configured token")
        if max_age <= 0 or idle <= 0:
            raise ValueError("max_age and idle must be > 0 seconds")
        self._hashes = [(name, bytes.fromhex(h.strip().lower())) for name, h in tokens.items()]
        self.max_age = float(max_age)
        self.idle = float(idle)
        self.max_sessions = int(max_sessions)
        self._clock = clock
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()

    # -- tokens and sessions -------------------------------------------------------------

    def token_name(self, token: str) -> str | None:
        """The configured name of ``token``, or None; constant time over the tokens."""
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, h in self._hashes:  # no early exit: the time does not tell which one
            if hmac.compare_digest(digest, h):
                found = name
        return found

    def open(self, token: str) -> str | None:
        """A new session id for a valid ``token``; None (and nothing stored) otherwise."""
        name = self.token_name(token) if token else None
        if name is None:
            return None
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= self.max_sessions:  # the oldest goes first
                oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
                del self._sessions[oldest]
            self._sessions[_key(sid)] = _Session(name, now, now)
        return sid

    def check(self, sid: str | None) -> str | None:
        """The token name behind a live session id (and refresh its idle timer), or None."""
        if not sid:
            return None
        now = self._clock()
        key = _key(sid)
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                return None
            if now - s.created > self.max_age or now - s.last_used > self.idle:
                del self._sessions[key]
                return None
            s.last_used = now
            return s.token_name

    def close(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_key(sid), None)

    def count(self) -> int:
        """Sessions held (live or not yet swept). No ``__len__``: an empty store is truthy."""
        with self._lock:
            return len(self._sessions)

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._sessions.items()
                if now - s.created > self.max_age or now - s.last_used > self.idle]
        for k in dead:
            del self._sessions[k]

    # -- ASGI helpers ------------------------------------------------------------------------

    def allows(self, scope: Scope) -> bool:
        """Whether ``scope`` is a read (GET/HEAD) carrying a live session cookie."""
        if scope.get("method", "GET") not in READ_METHODS:
            return False
        return self.check(session_cookie(scope)) is not None


def _key(sid: str) -> bytes:
    return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).digest()


def session_cookie(scope: Scope) -> str | None:
    """The value of our session cookie in the request's Cookie header(s), if any."""
    for k, v in scope.get("headers", ()):
        if k != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value
    return None


def safe_next(value: str | None, default: str = "/") -> str:
    """A same-site path to go to after login: never another host (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value \
            or any(ord(c) < 0x20 for c in value):
        return default
    return value


def login_url(next_path: str) -> str:
    return f"{LOGIN_PATH}?next={quote(safe_next(next_path), safe='/')}"


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>dicomnode: sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}}
input{{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box;margin:.3rem 0 1rem}}
button{{font-size:1rem;padding:.4rem 1.2rem}}.err{{color:#b00020}}</style></head><body>
<h1>dicomnode</h1>
<p>This node asks for one of its access tokens (<code>http.tokens</code> in its
configuration) before it shows images.</p>{error}
<form method="post" action="{action}">
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button></form></body></html>"""


def login_routes(store: SessionStore, *, secure_cookie: bool) -> list[Route]:
    """``GET/POST /login`` and ``POST /logout`` for ``store``."""

    def page(next_path: str, error: str = "", status: int = 200) -> Response:
        body = _PAGE.format(
            error=f'<p class="err">{html.escape(error)}</p>' if error else "",
            action=html.escape(LOGIN_PATH), next=html.escape(next_path))
        return HTMLResponse(body, status, headers={"Cache-Control": "no-store"})

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page(safe_next(request.query_params.get("next"), "/viewer/"))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                return page("/viewer/", "That request is too large.", 413)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        token = (form.get("token") or [""])[0]
        target = safe_next((form.get("next") or [""])[0], "/viewer/")
        sid = store.open(token)
        if sid is None:
            address = request.client.host if request.client else "?"
            LOG.warning("sign-in refused from %s: unknown token", address)
            return page(target, "That token is not one of this node's tokens.", 401)
        LOG.info("sign-in with token %r", store.token_name(token))
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, sid, max_age=int(store.max_age), path="/", httponly=True,
                        samesite="strict", secure=secure_cookie)
        return resp

    async def logout(request: Request) -> Response:
        store.close(session_cookie(request.scope))
        resp = RedirectResponse(LOGIN_PATH, status_code=303)
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=secure_cookie)
        return resp

    return [Route(LOGIN_PATH, login, methods=["GET", "POST"]),
            Route(LOGOUT_PATH, logout, methods=["POST"])]


__all__ = ["COOKIE", "SessionStore", "login_routes", "login_url", "safe_next",
           "session_cookie"]
