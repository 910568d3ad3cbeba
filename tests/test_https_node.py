"""The node's HTTP side over HTTPS, with and without required client certificates."""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_audit_events import _make_certs


def _https_get(url: str, ca: Path, cert: tuple[Path, Path] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=20) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_https_and_client_certificates(node_factory: Any, tmp_path: Path) -> None:
    certs = _make_certs(tmp_path)
    node = node_factory({"http": {"certfile": str(certs.server_cert),
                                  "keyfile": str(certs.server_key),
                                  "ca_file": str(certs.ca),
                                  "require_client_cert": True}}).start()
    base = f"https://127.0.0.1:{node.http_port}"
    client = (certs.client_cert, certs.client_key)
    assert _https_get(f"{base}/healthz", certs.ca, client) == 200
    assert _https_get(f"{base}/dicom-web/studies", certs.ca, client) in (200, 204)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _https_get(f"{base}/healthz", certs.ca)  # no client certificate: refused
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        # plain HTTP to the HTTPS port fails
        urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10).read()
    assert node.proc is not None and node.proc.poll() is None
    assert node.stop() == 0
