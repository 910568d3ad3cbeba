"""A real ``redis-server`` on loopback for tests (the broker of the Celery queue back-end).

``RedisServer`` writes its own configuration into a test folder: a free 127.0.0.1 port,
the append-only file on (``appendfsync always``: a stop and a crash keep every write the
server acknowledged), no RDB snapshots, protected mode. ``stop()`` (SIGTERM) / ``kill9()``
/ ``start()`` simulate an outage on the same data and port. The ``redis_server`` fixture
always stops it; it skips the test when ``redis-server`` is not installed (``make test``
installs it: scripts/install-system-deps).

Use it from a test module with ``from redis_server import RedisServer, redis_server  # noqa``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server process; its data (AOF) and log live in ``workdir``."""

    def __init__(self, workdir: Path, *, appendfsync: str = "always") -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.config_path = self.workdir / "redis.conf"
        self.log_path = self.workdir / "redis.log"
        self.config_path.write_text("\n".join([
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.workdir}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly yes",
            f"appendfsync {appendfsync}",
            f"logfile {self.log_path}",
            "databases 16",
        ]) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2,
                           socket_timeout=5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen([self.binary, str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                       f"{self.log()[-2000:]}")
                try:
                    if client.ping():
                        return self
                except Exception:
                    time.sleep(0.05)
        finally:
            client.close()
        self.kill9()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of this test (stopped afterwards, whatever happened)."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make test installs it: "
                    "scripts/install-system-deps)")
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.kill9()
