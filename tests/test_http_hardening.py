"""The HTTP side refuses what it should: foreign Host headers (DNS rebinding), open
binds in the config, stalled clients (slowloris), unauthenticated metrics scrapes.

Real node processes, real sockets on loopback, every process stopped by its fixture.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_series, run_cli, storescu, uids

TOKEN = "dicomweb-token-not-a-secret"
METRICS_TOKEN = "metrics-token-not-a-secret"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def request(port: int, path: str, host: str | None = None, token: str | None = None,
            timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Host": host or f"127.0.0.1:{port}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_foreign_host_is_refused_and_never_echoed(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory().start()
    files = make_series(tmp_path / "s", n=2, size=32)
    assert storescu(node.port, files).returncode == 0
    study = uids(files[0])[0]
    port = node.http_port
    # a page of evil.example rebinding its name to 127.0.0.1 still sends its own name
    for path in ("/dicom-web/studies", f"/dicom-web/studies/{study}/metadata", "/metrics"):
        status, body = request(port, path, host=f"evil.example:{port}")
        assert status == 400, (path, status, body)
        assert b"evil" not in body
    assert request(port, "/healthz", host="evil.example")[0] == 200  # probes: any name
    assert request(port, "/readyz", host="10.1.2.3:9")[0] == 200
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert request(port, "/dicom-web/studies", host=host)[0] == 200, host
    status, body = request(port, f"/dicom-web/studies/{study}/metadata",
                           host=f"localhost:{port}")
    assert status == 200
    urls = [v for item in json.loads(body) for v in json.dumps(item).split('"')
            if v.startswith("http")]
    assert urls and all(u.startswith(f"http://localhost:{port}/dicom-web/") for u in urls)


def test_config_check_refuses_open_settings(tmp_path: Path) -> None:
    def check(http: dict[str, Any]) -> tuple[int, str]:
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump({"storage": str(tmp_path / "s"), "http": http}))
        out = run_cli("config", "check", str(path))
        return out.returncode, out.stdout + out.stderr

    code, text = check({"bind_address": "0.0.0.0"})
    assert code == 2 and "http: bind_address: 0.0.0.0" in text and "http.tokens" in text, text
    code, text = check({"bind_address": "10.0.0.5"})
    assert code == 2 and "bind_address" in text
    code, text = check({"cors_origins": ["*"]})
    assert code == 2 and "cors_origins" in text, text
    tokens = [{"name": "pacs", "sha256": _digest(TOKEN)}]
    code, text = check({"cors_origins": ["*"], "tokens": tokens, "cors_allow_credentials": True})
    assert code == 2 and "cors_allow_credentials" in text, text
    code, text = check({"allowed_hosts": ["*"]})
    assert code == 2 and "allowed_hosts" in text, text
    assert check({"bind_address": "0.0.0.0", "tokens": tokens})[0] == 0
    assert check({"bind_address": "0.0.0.0", "allow_unauthenticated": True})[0] == 0
    assert check({"cors_origins": ["https://viewer.example.org"]})[0] == 0


def _stalled_head(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return s


def _stalled_body(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b'Content-Type: multipart/related; type="application/dicom"; boundary=XyZ\r\n'
              b"Content-Length: 100000000\r\n\r\n"
              b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 70000)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """The server closed the connection (after any answer it sent)."""
    s.settimeout(0.05)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.timeout(180)
def test_250_stalled_connections_do_not_block_and_are_dropped(node_factory: Any) -> None:
    node = node_factory({"http": {"header_timeout_seconds": 3, "body_timeout_seconds": 3}})
    node.start()
    port = node.http_port
    sockets: list[socket.socket] = []
    try:
        for i in range(250):
            if i % 5 == 0:
                sockets.append(_stalled_body(port))  # each holds a STOW temp file
            elif i % 5 == 1:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            else:
                sockets.append(_stalled_head(port))
        time.sleep(0.5)
        tmp = node.storage / "tmp"
        assert any(tmp.glob("stow-*.part")), "the stalled uploads should hold temp files"
        for _ in range(3):  # real clients are served at once, again and again
            t0 = time.monotonic()
            assert request(port, "/dicom-web/studies")[0] in (200, 204)
            assert request(port, "/readyz")[0] == 200
            assert time.monotonic() - t0 < 2.0
        deadline = time.monotonic() + 15
        open_ = list(sockets)
        while open_ and time.monotonic() < deadline:
            open_ = [s for s in open_ if not _closed_by_peer(s)]
            time.sleep(0.2)
        assert not open_, f"{len(open_)} stalled connections still open after the deadlines"
        node.wait_for(lambda: not list(tmp.glob("stow-*.part")), timeout=10)
        assert "closed: no complete request head within 3 s" in node.log()
        assert "closed: request body stalled for 3 s" in node.log()
        assert request(port, "/dicom-web/studies")[0] in (200, 204)
    finally:
        for s in sockets:
            s.close()
    assert node.stop() == 0


@pytest.mark.timeout(120)
def test_connection_cap_makes_room_for_real_clients(node_factory: Any) -> None:
    node = node_factory({"http": {"max_connections": 16, "header_timeout_seconds": 60}})
    node.start()
    port = node.http_port
    sockets = [_stalled_head(port) for _ in range(60)]
    try:
        time.sleep(0.5)
        for _ in range(5):  # each real request evicts the oldest stalled head
            assert request(port, "/dicom-web/studies")[0] in (200, 204)
        time.sleep(0.5)
        still_open = [s for s in sockets if not _closed_by_peer(s)]
        assert len(still_open) <= 16, len(still_open)
    finally:
        for s in sockets:
            s.close()
    assert node.stop() == 0


def test_metrics_need_a_token_when_tokens_are_set(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory({"http": {"tokens": [{"name": "pacs", "sha256": _digest(TOKEN)}],
                                  "metrics_tokens": [{"name": "prom",
                                                      "sha256": _digest(METRICS_TOKEN)}]}})
    node.start()
    files = make_series(tmp_path / "s", n=2, size=32)
    assert storescu(node.port, files, aet="SECRETAE").returncode == 0
    port = node.http_port
    assert request(port, "/metrics")[0] == 401
    assert request(port, "/metrics", token="wrong")[0] == 401
    for token in (TOKEN, METRICS_TOKEN):
        status, body = request(port, "/metrics", token=token)
        assert status == 200 and b"SECRETAE" in body  # authenticated: callers listed
    assert request(port, "/dicom-web/studies", token=METRICS_TOKEN)[0] == 401  # metrics only
    for probe in ("/healthz", "/readyz"):
        status, body = request(port, probe)
        assert status == 200 and b"SECRETAE" not in body
    assert node.stop() == 0


def test_open_metrics_list_no_calling_ae(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory().start()  # loopback, no tokens: /metrics answers, but anonymously
    files = make_series(tmp_path / "s", n=3, size=32)
    assert storescu(node.port, files, aet="SECRETAE").returncode == 0
    status, body = request(node.http_port, "/metrics")
    assert status == 200
    assert b"SECRETAE" not in body and b"calling_ae" not in body
    instances = [line for line in body.decode().splitlines()
                 if line.startswith("dicomnode_index_instances{")]
    assert instances and sum(float(x.rsplit(" ", 1)[1]) for x in instances) == 3
    assert node.stop() == 0


def test_the_uvicorn_internals_the_guard_relies_on() -> None:
    """dicomnode.web.protocol subclasses uvicorn's H11Protocol and reads its ``conn``,
    ``connections``, ``flow``, ``transport`` and ``loop`` and overrides its hooks: an
    uvicorn upgrade that renames one fails here, naming it, before the deadlines and the
    connection cap stop working (the tests above pin their behaviour)."""
    import asyncio
    import inspect
    from unittest import mock

    import h11
    from uvicorn.config import Config
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    for hook, parameters in (("connection_made", ["self", "transport"]),
                             ("connection_lost", ["self", "exc"]),
                             ("data_received", ["self", "data"]),
                             ("on_response_complete", ["self"])):
        assert list(inspect.signature(getattr(H11Protocol, hook)).parameters) == parameters, hook
    config = Config(app=app, http="h11", lifespan="off", log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        proto = H11Protocol(config=config, server_state=ServerState(), app_state={},
                            _loop=loop)
        transport = mock.MagicMock()
        transport.get_extra_info.return_value = None
        proto.connection_made(transport)
        assert isinstance(proto.conn, h11.Connection) and proto.conn.their_state is h11.IDLE
        assert proto in proto.connections
        assert proto.flow.read_paused is False
        assert proto.transport is transport and proto.loop is loop
        proto.connection_lost(None)
        assert proto not in proto.connections
    finally:
        loop.close()
