"""Serving an ASGI application with uvicorn in a background thread, with deadlines for
slow clients and a connection cap (:mod:`dicomnode.web.protocol`)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from dicomnode.web.protocol import ConnectionLimits, guarded_protocol


class ServerHandle:
    """A uvicorn server running in a background thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)


def serve_in_thread(app: ASGIApp, host: str, port: int,
                    ssl: dict[str, Any] | None = None, *, timeout: float = 15.0,
                    limits: ConnectionLimits | None = None,
                    keep_alive: float = 5.0) -> ServerHandle:
    """Start ``app`` with uvicorn in a daemon thread; returns once it listens.

    ``port`` 0 picks a free port (``handle.port``). ``ssl``: uvicorn's TLS options,
    e.g. ``{"ssl_certfile": ..., "ssl_keyfile": ..., "ssl_ca_certs": ...,
    "ssl_cert_reqs": ssl.CERT_REQUIRED}``. ``limits``: head and body deadlines and the
    connection cap; ``keep_alive``: seconds an idle keep-alive connection stays open.
    """
    limits = limits or ConnectionLimits()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            access_log=False, server_header=False,
                            http=guarded_protocol(limits), timeout_keep_alive=math.ceil(keep_alive),
                            # a backstop behind the protocol's own cap (which makes room)
                            limit_concurrency=limits.max_connections + 1,
                            h11_max_incomplete_event_size=16 * 1024, **(ssl or {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dicomweb-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the DICOMweb server did not start on {host}:{port}")
        time.sleep(0.01)
    return ServerHandle(server, thread)
