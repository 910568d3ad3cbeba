"""OHIF at /viewer/ (dicomnode.web.viewer), the sign-in that lets a browser read
DICOMweb (dicomnode.web.session), and the installer (scripts/install-viewer).

A small fake build (the same shapes as @ohif/app's dist: an index.html naming /...
assets, a bundle that sets the webpack public path to "/", CSS fonts from the root, a
manifest) checks the serving rules; the real installed build, where present, is
checked for the very strings the rewriting relies on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, make_series

from dicomnode.config import parse_config
from dicomnode.core.index import Index
from dicomnode.errors import InvalidUIDError
from dicomnode.http import build_app
from dicomnode.ingest.spool import Spool
from dicomnode.metrics import Metrics
from dicomnode.web.auth import hash_token
from dicomnode.web.server import serve_in_thread
from dicomnode.web.session import COOKIE, SessionStore, safe_next
from dicomnode.web.viewer import (
    OHIF_VERSION,
    STAMP,
    ViewerInstall,
    app_config_js,
    default_viewer_dir,
    study_link,
)

TOKEN = "viewer-test-token-not-a-secret"
BUNDLE = "app.bundle.0f6159c501addfe9.js"


def fake_dist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(
        '<!doctype html><html><head><link rel="manifest" href="/manifest.json">'
        '<script>window.PUBLIC_URL="/"</script><script src="/app-config.js"></script>'
        f'<script defer src="/{BUNDLE}"></script><link href="/app.bundle.css" rel="stylesheet">'
        '<a href="https://ohif.org/">x</a></head><body><div id="root"></div></body></html>')
    (folder / BUNDLE).write_text('(()=>{__webpack_require__.p = "/";})(); var x = 1;')
    (folder / "9383.bundle.40008913697b48b8.js").write_text("var noPublicPath = 2;")
    (folder / "app.bundle.css").write_text(
        "@font-face{src:url(/a34f9d1faa5f3315.woff2) format('woff2')}a{background:url(data:x)}")
    (folder / "a34f9d1faa5f3315.woff2").write_bytes(b"wOF2fake")
    (folder / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "manifest.json").write_text('{"icons": [{"src": "/assets/a.png"}]}')
    (folder / "app-config.js").write_text("window.config = {dataSources: ['theirs']};")
    (folder / STAMP).write_text(json.dumps({"version": OHIF_VERSION, "integrity": "sha512-x"}))
    return folder


@contextlib.contextmanager
def _client(tmp_path: Path, viewer_dir: Path | None, tokens: bool = False
            ) -> Iterator[httpx.Client]:
    """The node's HTTP app (build_app) on a loopback port, and a client for it."""
    http: dict[str, Any] = {"viewer_dir": str(viewer_dir) if viewer_dir else None}
    if tokens:
        http["tokens"] = [{"name": "reader", "sha256": hash_token(TOKEN)}]
    config = parse_config({"storage": str(tmp_path / "storage"), "http": http})
    spool = Spool(config.storage)
    index = Index(Index.path_for(config.storage))
    app = build_app(config, spool, index, Metrics(index=index), [], lambda: None)
    handle = serve_in_thread(app, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{handle.port}", timeout=30) as c:
            yield c
    finally:
        handle.stop()
        index.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    with _client(tmp_path, fake_dist(tmp_path / "dist")) as c:
        yield c


def test_index_and_spa_routes_are_rewritten_for_the_sub_path(client: httpx.Client) -> None:
    assert client.get("/viewer").headers["location"] == "/viewer/"
    page = client.get("/viewer/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'window.PUBLIC_URL="/viewer/"' in html
    assert f'src="/viewer/{BUNDLE}"' in html and 'href="/viewer/app.bundle.css"' in html
    assert 'href="/viewer/manifest.json"' in html and 'href="https://ohif.org/"' in html
    assert not re.search(r'(src|href)="/(?!viewer/)', html)
    assert page.headers["cache-control"] == "no-cache"
    for route in ("/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/segmentation",
                  "/viewer/index.html", "/viewer/local/"):
        r = client.get(route)
        assert r.status_code == 200 and r.text == html, route


def test_assets_public_path_fonts_and_caching(client: httpx.Client) -> None:
    js = client.get(f"/viewer/{BUNDLE}")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert '__webpack_require__.p = "/viewer/";' in js.text and "var x = 1;" in js.text
    assert js.headers["cache-control"] == "public, max-age=31536000, immutable"
    plain = client.get("/viewer/9383.bundle.40008913697b48b8.js")
    assert plain.text == "var noPublicPath = 2;"
    css = client.get("/viewer/app.bundle.css").text
    assert "url(/viewer/a34f9d1faa5f3315.woff2)" in css and "url(data:x)" in css
    wasm = client.get("/viewer/0ddf166f7a343eda.wasm")
    assert wasm.headers["content-type"] == "application/wasm" and wasm.content.startswith(b"\0asm")
    assert '"/viewer/assets/a.png"' in client.get("/viewer/manifest.json").text
    # missing assets are 404s, not the page; nothing outside the build, no dotfiles
    for bad in ("/viewer/nope.bundle.js", "/viewer/assets/x.png", "/viewer/../pyproject.toml",
                "/viewer/%2e%2e/%2e%2e/pyproject.toml", f"/viewer/{STAMP}"):
        r = client.get(bad)
        assert r.status_code == 404 or "PUBLIC_URL" in r.text, bad
        assert "dependencies" not in r.text and "sha512" not in r.text, bad


def test_app_config_points_ohif_at_the_nodes_own_dicomweb(client: httpx.Client) -> None:
    r = client.get("/viewer/app-config.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    text = r.text
    assert "theirs" not in text  # the node's config replaces the build's own
    assert 'window.location.origin + "/dicom-web"' in text
    body = json.loads(text.split("var config = ", 1)[1].split(";\n", 1)[0])
    assert body["routerBasename"] == "/viewer"
    (source,) = body["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert body["defaultDataSourceName"] == source["sourceName"]
    c = source["configuration"]
    assert c["imageRendering"] == c["thumbnailRendering"] == "wadors"
    assert c["enableStudyLazyLoad"] and c["omitQuotationForMultipartRequest"]
    assert c["bulkDataURI"]["enabled"] and c["singlepart"] is False and not c["staticWado"]
    # behind a proxy: the configured public DICOMweb root, verbatim
    proxied = app_config_js(dicomweb_root="https://node.example.org/dicom-web/")
    assert 'var root = "https://node.example.org/dicom-web";' in proxied


def test_without_the_build_the_page_says_how_to_install_it(tmp_path: Path) -> None:
    with _client(tmp_path, tmp_path / "not-installed") as c:
        for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/app.js"):
            r = c.get(path)
            assert r.status_code == 404 and "make viewer" in r.text and "npm" in r.text
        assert c.get("/healthz").status_code == 200  # the node itself is unaffected


def test_an_incomplete_install_is_not_served(tmp_path: Path) -> None:
    dist = fake_dist(tmp_path / "dist")
    (dist / STAMP).unlink()  # e.g. copied by hand, not by scripts/install-viewer
    assert ViewerInstall.find(dist) is None
    with _client(tmp_path, dist) as c:
        assert "make viewer" in c.get("/viewer/").text


def test_study_link() -> None:
    assert study_link("1.2.840.113619.2.5") == "/viewer/viewer?StudyInstanceUIDs=1.2.840.113619.2.5"
    for bad in ("", "1.2.3&x=<script>", "../1.2"):
        with pytest.raises(InvalidUIDError):
            study_link(bad)


# -- tokens: a browser signs in once; the cookie reads DICOMweb, never writes ------------


def test_sign_in_then_ohif_reads_dicomweb_with_the_session_cookie(tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=3, size=16)
    with _client(tmp_path, fake_dist(tmp_path / "dist"), tokens=True) as c:
        # the page needs a session; assets and app-config.js hold no patient data
        r = c.get("/viewer/viewer?StudyInstanceUIDs=1.2.3")
        assert r.status_code == 303
        assert r.headers["location"] == "/login?next=/viewer/viewer%3FStudyInstanceUIDs%3D1.2.3"
        assert c.get(f"/viewer/{BUNDLE}").status_code == 200
        assert c.get("/viewer/app-config.js").status_code == 200
        assert TOKEN not in c.get("/viewer/app-config.js").text
        assert c.get("/dicom-web/studies").status_code == 401
        form = c.get("/login?next=/viewer/").text
        assert 'type="password"' in form and 'value="/viewer/"' in form

        wrong = c.post("/login", data={"token": "nope", "next": "/viewer/"})
        assert wrong.status_code == 401 and COOKIE not in wrong.headers.get("set-cookie", "")
        ok = c.post("/login", data={"token": TOKEN, "next": "https://evil.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/viewer/"  # no open redirect
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
        for flag in ("HttpOnly", "SameSite=strict", "Path=/"):
            assert flag.lower() in cookie.lower(), cookie

        assert c.get("/viewer/").status_code == 200
        assert c.get("/dicom-web/studies").status_code in (200, 204)
        # a write with only the cookie is refused: STOW-RS needs the bearer token
        body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + files[0].read_bytes()
                + b"\r\n--b--\r\n")
        ctype = 'multipart/related; type="application/dicom"; boundary=b'
        assert c.post("/dicom-web/studies", content=body,
                      headers={"Content-Type": ctype}).status_code == 401
        bearer = c.post("/dicom-web/studies", content=body, headers={
            "Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200

        out = c.post("/logout")
        assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
        c.cookies.clear()
        assert c.get("/dicom-web/studies").status_code == 401


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    store = SessionStore({"a": hash_token("t")}, max_age=100, idle=30, max_sessions=3,
                         clock=lambda: now[0])
    assert store.open("wrong") is None and store.open("") is None and store.count() == 0
    sid = store.open("t")
    assert sid and store.check(sid) == "a" and store.check(sid + "x") is None
    now[0] += 29
    assert store.check(sid) == "a"  # used: the idle timer restarts
    now[0] += 29
    assert store.check(sid) == "a"
    now[0] += 31
    assert store.check(sid) is None  # idle too long
    sids = [store.open("t") for _ in range(4)]
    assert store.count() == 3 and store.check(sids[0]) is None and store.check(sids[3]) == "a"
    now[0] += 101
    assert store.check(sids[3]) is None  # too old, however busy
    assert store.allows({"method": "POST", "headers": [(b"cookie", f"{COOKIE}={sid}".encode())]}) \
        is False
    with pytest.raises(ValueError):
        SessionStore({})
    assert safe_next("//evil.example/x") == "/" and safe_next("/viewer/?a=1") == "/viewer/?a=1"
    assert safe_next("/\\evil") == "/" and safe_next("https://x") == "/"


# -- the real build and its installer ------------------------------------------------------


def _installed() -> ViewerInstall:
    install = ViewerInstall.find(default_viewer_dir())
    if install is None:
        pytest.skip(f"OHIF is not installed in {default_viewer_dir()} (make viewer)")
    return install


def test_the_installed_build_is_the_pinned_one_and_rewrites_cleanly(tmp_path: Path) -> None:
    install = _installed()
    script = (ROOT / "scripts" / "install-viewer").read_text()
    pinned = re.search(r'OHIF_INTEGRITY="(sha512-[^"]+)"', script)
    assert pinned and install.integrity == pinned.group(1)
    assert install.version == OHIF_VERSION and f'OHIF_VERSION="{OHIF_VERSION}"' in script
    with _client(tmp_path, install.root) as c:
        html = c.get("/viewer/").text
        assert 'window.PUBLIC_URL="/viewer/"' in html
        assert not re.search(r'(src|href)="/(?!viewer/)', html)
        for src in re.findall(r'(?:src|href)="/viewer/([^"]+)"', html):
            assert (install.root / src).is_file(), src
        patched = 0
        for bundle in sorted(install.root.glob("*.js")):
            if b'__webpack_require__.p = "/";' in bundle.read_bytes():
                body = c.get(f"/viewer/{bundle.name}").content
                assert body.count(b'__webpack_require__.p = "/viewer/";') == 1, bundle.name
                patched += 1
        assert patched >= 2  # the app and its workers
        css = c.get("/viewer/app.bundle.css").text
        assert "url(/viewer/" in css and not re.search(r"url\(/(?!viewer/)", css)


def test_installer_refuses_a_tarball_with_another_hash(tmp_path: Path) -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm is not installed (apt-get install nodejs npm)")
    _installed()  # the tarball is in npm's cache then: no second download
    copy = tmp_path / "repo" / "scripts"
    copy.mkdir(parents=True)
    text = (ROOT / "scripts" / "install-viewer").read_text()
    wrong = "sha512-" + hashlib.sha512(b"not the tarball").digest().hex()[:86] + "=="
    text = re.sub(r'OHIF_INTEGRITY="[^"]+"', f'OHIF_INTEGRITY="{wrong}"', text)
    (copy / "install-viewer").write_text(text)
    dest = tmp_path / "viewer"
    run = subprocess.run(["bash", str(copy / "install-viewer"), str(dest)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "REFUSED" in run.stderr and "integrity mismatch" in run.stderr
    assert not dest.exists()
