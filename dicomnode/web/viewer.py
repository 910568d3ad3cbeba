"""OHIF at ``/viewer/``: the published ``@ohif/app`` build, served by the node itself.

``scripts/install-viewer`` (``make viewer``) puts the prebuilt ``dist/`` of one pinned,
integrity-checked ``@ohif/app`` version in ``viewer/ohif-<version>/``; nothing is ever
fetched at run time. This module serves that folder under ``/viewer/``:

* **Its own DICOMweb.** ``/viewer/app-config.js`` is written by the node
  (:func:`app_config_js`): one DICOMweb data source whose QIDO-RS, WADO-RS and
  WADO-URI roots are the node's ``/dicom-web`` on the page's own origin (or
  ``http.public_url``), so no CORS and no second server.
* **Under a sub-path.** The build assumes it lives at ``/``: ``index.html``,
  ``manifest.json`` and the CSS (fonts) name ``/...`` assets, and the webpack runtime of the app bundle
  and of its workers loads chunks, workers and WebAssembly from the public path
  ``"/"``. Those few strings are rewritten in memory when served (checked: each
  bundle has the public-path assignment exactly once); the files on disk stay
  byte-identical to the checked tarball. OHIF's router gets ``routerBasename``.
* **A single-page app.** Any ``/viewer/<route>`` that is not a file (``/viewer/``,
  ``/viewer/viewer?StudyInstanceUIDs=...``, ``/viewer/segmentation``...) answers
  ``index.html``; a missing asset (a name with an extension) is a 404.
* **Tokens.** The viewer's files hold no patient data and are served to anyone, like
  ``/healthz``. Where the node has bearer tokens, the HTML page first sends the
  browser to ``/login`` (:mod:`dicomnode.web.session`): a session cookie, accepted
  for DICOMweb reads, is how OHIF's requests get through; no token is ever written
  into a page or script.
* **Not installed.** Without the folder, ``/viewer/`` answers a short page saying how
  to install it; the node runs the same.

:func:`study_link` is the link the status page gives for each study.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from dicomnode.core.uids import check_uid as validate_uid
from dicomnode.errors import InvalidUIDError
from dicomnode.web.session import SessionStore, login_url

LOG = logging.getLogger(__name__)

PREFIX = "/viewer"
OHIF_VERSION = "3.13.2"
STAMP = ".dicomnode-viewer.json"
DICOMWEB_PATH = "/dicom-web"

#: the webpack runtime's public path in the app bundle and each worker bundle
_PUBLIC_PATH_JS = b'__webpack_require__.p = "/";'
_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
    ".css": "text/css", ".json": "application/json", ".map": "application/json",
    ".svg": "image/svg+xml", ".woff2": "font/woff2", ".woff": "font/woff",
    ".html": "text/html; charset=utf-8", ".ico": "image/x-icon", ".png": "image/png",
    ".txt": "text/plain; charset=utf-8", ".xml": "application/xml",
}
# content-hashed names (app.bundle.0f6159c501addfe9.js, 34b1e6b1deb5828e.wasm) never change
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.[a-z0-9]+$")
_IMMUTABLE = "public, max-age=31536000, immutable"


def default_viewer_dir() -> Path:
    """``viewer/ohif-<version>`` in the source tree (where ``make viewer`` installs it)."""
    return Path(__file__).resolve().parents[2] / "viewer" / f"ohif-{OHIF_VERSION}"


def study_link(study_uid: str, prefix: str = PREFIX) -> str:
    """The OHIF link that opens one study (its default "viewer" mode), e.g. for the
    status page: ``/viewer/viewer?StudyInstanceUIDs=<uid>``. Refuses a non-UID."""
    uid = validate_uid(study_uid, "Study Instance UID")
    return f"{prefix.rstrip('/')}/viewer?StudyInstanceUIDs={uid}"


@dataclass(frozen=True)
class ViewerInstall:
    """An installed OHIF build: its folder and what ``scripts/install-viewer`` recorded."""

    root: Path
    version: str
    integrity: str

    @classmethod
    def find(cls, directory: Path) -> ViewerInstall | None:
        """The install in ``directory``, or None when it is absent or incomplete."""
        root = Path(directory)
        if not (root / "index.html").is_file():
            return None
        try:
            stamp = json.loads((root / STAMP).read_text())
            version, integrity = str(stamp["version"]), str(stamp["integrity"])
        except (OSError, ValueError, KeyError, TypeError):
            LOG.warning("viewer: %s has no readable %s; re-run make viewer", root, STAMP)
            return None
        return cls(root.resolve(), version, integrity)


def app_config_js(*, dicomweb_root: str | None = None, prefix: str = PREFIX,
                  name: str = "dicomnode") -> str:
    """OHIF 3.13's ``window.config`` for this node (``app-config.js``).

    ``dicomweb_root``: an absolute DICOMweb root (``http.public_url``); by default the
    page's own origin + ``/dicom-web``, worked out in the browser. Data source options
    (extensions/default DicomWebDataSource in OHIF 3.13):

    * ``qidoRoot``/``wadoRoot``/``wadoUriRoot``: the node's one DICOMweb root;
    * ``imageRendering``/``thumbnailRendering: 'wadors'``: pixels (and thumbnails,
      drawn in the browser) come from WADO-RS frames, never from server rendering;
    * ``enableStudyLazyLoad``: series metadata load one series at a time;
    * ``supportsWildcard`` (``*``/``?`` in QIDO matching keys), no
      ``supportsFuzzyMatching`` (the node does not do PS3.18 fuzzy PN matching) and
      no ``qidoSupportsIncludeField`` (OHIF then asks for nothing the node may not
      return);
    * ``bulkDataURI.enabled``: metadata carries absolute BulkDataURIs; ``singlepart``
      off: every WADO-RS answer of the node is ``multipart/related``;
    * ``omitQuotationForMultipartRequest``: ``Accept: multipart/related;
      type=application/octet-stream`` without quotes, as most servers parse it;
    * ``staticWado`` off: the node answers real QIDO-RS queries;
    * no STOW, no reject, no upload from the viewer: it is a reading tool here.

    OHIF's own notice that it is for investigational use stays on (once per browser
    session), as does its first-visit tour.
    """
    root_js = (json.dumps(dicomweb_root.rstrip("/")) if dicomweb_root
               else f"window.location.origin + {json.dumps(DICOMWEB_PATH)}")
    source = {
        "friendlyName": f"{name} DICOMweb",
        "name": name,
        "qidoSupportsIncludeField": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": False,
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
        "supportsReject": False,
        "supportsStow": False,
        "dicomUploadEnabled": False,
    }
    config = {
        "name": "dicomnode",
        "routerBasename": prefix.rstrip("/") or "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": name,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": name,
            "configuration": source,
        }],
    }
    body = json.dumps(config, indent=2)
    return (
        "/** @type {AppTypes.Config} */\n"
        "// Written by dicomnode (dicomnode/web/viewer.py): OHIF reads this node's own DICOMweb.\n"
        f"(function () {{\n  var root = {root_js};\n  var config = {body};\n"
        "  var ds = config.dataSources[0].configuration;\n"
        "  ds.qidoRoot = root; ds.wadoRoot = root; ds.wadoUriRoot = root;\n"
        "  window.config = config;\n})();\n"
    )


class _Files:
    """The install's files, with the few rewritten for the sub-path cached in memory."""

    def __init__(self, install: ViewerInstall, prefix: str) -> None:
        self.install = install
        self.base = prefix.rstrip("/") + "/"
        self._patched: dict[str, tuple[float, bytes | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, rel: str) -> Path | None:
        """The file for a URL path inside the install, or None (never outside it)."""
        if not rel or "\x00" in rel or any(p.startswith(".") for p in rel.split("/")):
            return None
        try:
            path = (self.install.root / rel).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if not path.is_relative_to(self.install.root) or not path.is_file():
            return None
        return path

    def patched(self, path: Path) -> bytes | None:
        """The served bytes when the file needs rewriting for the sub-path, else None."""
        if path.suffix not in (".html", ".js", ".json", ".css") or path.name == STAMP:
            return None
        key = str(path)
        mtime = path.stat().st_mtime
        with self._lock:
            hit = self._patched.get(key)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        data = path.read_bytes()
        out = self._rewrite(path, data)
        with self._lock:
            self._patched[key] = (mtime, out)
        return out

    def _rewrite(self, path: Path, data: bytes) -> bytes | None:
        base = self.base.encode()
        if path.suffix == ".html":
            out = data.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="' + base + b'"')
            return re.sub(rb'(href|src|content)="/(?!/)', rb'\1="' + base, out)
        if path.name == "manifest.json":
            return data.replace(b'"/assets/', b'"' + base + b'assets/')
        if path.suffix == ".css":  # fonts named from the root: url(/a34f9d1faa5f3315.woff2)
            out = re.sub(rb'url\(\s*(["\']?)/(?!/)', rb'url(\1' + base, data)
            return out if out != data else None
        if path.suffix == ".js":
            n = data.count(_PUBLIC_PATH_JS)
            if n == 0:
                return None
            if n > 1:
                LOG.warning("viewer: %s sets its public path %d times; served as is", path.name, n)
                return None
            return data.replace(_PUBLIC_PATH_JS, b'__webpack_require__.p = "' + base + b'";')
        return None


def _media_type(path: Path) -> str:
    return _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] \
        or "application/octet-stream"


_MISSING = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Viewer not installed</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}}
code,pre{{background:#f3f3f3;padding:.1rem .3rem}}</style></head><body>
<h1>The OHIF viewer is not installed on this node</h1>
<p>The node works without it (DICOM, DICOMweb under <code>/dicom-web</code>, results).
To read studies in the browser at <code>/viewer/</code>, install the pinned OHIF {version}
build once, in the node's source folder, then restart the node:</p>
<pre>sudo apt-get install nodejs npm   # Debian/Ubuntu, if npm is missing
make viewer                       # scripts/install-viewer: pinned version, integrity-checked</pre>
<p>It goes to <code>{folder}</code>. Nothing is downloaded while the node runs.</p>
</body></html>"""


def viewer_routes(directory: Path | None = None, *, dicomweb_root: str | None = None,
                  sessions: SessionStore | None = None, prefix: str = PREFIX) -> list[Any]:
    """The routes that serve OHIF under ``prefix`` (to go before the DICOMweb mount).

    ``directory``: the installed build (default :func:`default_viewer_dir`);
    ``dicomweb_root``: an absolute DICOMweb root for OHIF (``http.public_url``);
    ``sessions``: when the node has tokens, the HTML page needs a session
    (:mod:`dicomnode.web.session`).
    """
    folder = Path(directory) if directory is not None else default_viewer_dir()
    prefix = "/" + prefix.strip("/")
    install = ViewerInstall.find(folder)
    if install is None:
        LOG.info("viewer: OHIF is not installed in %s (make viewer); /viewer/ says how", folder)

        async def missing(request: Request) -> Response:
            return HTMLResponse(_MISSING.format(version=OHIF_VERSION, folder=folder), 404,
                                headers={"Cache-Control": "no-cache"})
        return [Route(prefix, missing), Mount(prefix, routes=[Route("/{path:path}", missing)])]

    LOG.info("viewer: OHIF %s at %s/ (from %s)", install.version, prefix, install.root)
    if install.version != OHIF_VERSION:
        LOG.warning("viewer: installed OHIF %s, this node expects %s; make viewer updates it",
                    install.version, OHIF_VERSION)
    files = _Files(install, prefix)
    config_js = app_config_js(dicomweb_root=dicomweb_root, prefix=prefix)

    async def app_config(request: Request) -> Response:
        return Response(config_js, media_type="text/javascript",
                        headers={"Cache-Control": "no-cache"})

    async def page(request: Request) -> Response:
        if sessions is not None and not sessions.check(_cookie(request)):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(login_url(target), status_code=303)
        index = files.resolve("index.html")
        body = files.patched(index) if index is not None else None
        if body is None:
            return Response("viewer index missing", 500)
        return Response(body, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    async def asset(request: Request) -> Response:
        rel = request.path_params["path"]
        if rel in ("", "index.html"):
            return await page(request)
        path = files.resolve(rel)
        if path is None:
            last = rel.rsplit("/", 1)[-1]
            if "." in last:  # a missing asset, not an OHIF route
                return Response("not found", 404, media_type="text/plain")
            return await page(request)
        cache = _IMMUTABLE if _HASHED.search(path.name) else "no-cache"
        body = files.patched(path)
        if body is not None:
            return Response(body, media_type=_media_type(path), headers={"Cache-Control": cache})
        return FileResponse(path, media_type=_media_type(path), headers={"Cache-Control": cache})

    async def to_slash(request: Request) -> Response:
        return RedirectResponse(prefix + "/", status_code=307)

    inner = Starlette(routes=[
        Route("/app-config.js", app_config),
        Route("/{path:path}", asset, methods=["GET", "HEAD"]),
    ])
    return [Route(prefix, to_slash), Mount(prefix, app=inner)]


def _cookie(request: Request) -> str | None:
    from dicomnode.web.session import session_cookie

    return session_cookie(request.scope)


__all__ = ["OHIF_VERSION", "PREFIX", "ViewerInstall", "app_config_js", "default_viewer_dir",
           "study_link", "viewer_routes", "InvalidUIDError"]
