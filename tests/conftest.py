"""Shared fixtures: a real node in a subprocess, DCMTK peers, test data.

Everything talks over 127.0.0.1 on ephemeral ports, and every process a test
starts is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "data"


def shared(*parts: str) -> Path:
    """A path in ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not available: {path} (only in the project workspace)")
    return path


def dicom_files(folder: Path) -> list[Path]:
    """Every *.dcm file under ``folder`` (or files without suffix that are DICOM)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() in (".md", ".txt", ".json", ".tsv", ".py"):
            continue
        with p.open("rb") as f:
            head = f.read(132)
        if p.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
            out.append(p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it: scripts/install-system-deps)")
    return path


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files: list[Path], *, aec: str = "DICOMNODE", aet: str = "STORESCU",
             extra: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu (one association); returns the finished process."""
    need_tool("storescu")
    cmd = ["storescu", "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port)]
    cmd += [str(f) for f in files]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


class NodeProcess:
    """``dicomnode serve`` in a subprocess with a config written by the test."""

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.storage = workdir / "storage"
        self.config_path = workdir / "node.yaml"
        self.log_path = workdir / "node.log"
        cfg: dict[str, Any] = {
            "ae_title": "DICOMNODE",
            "bind_address": "127.0.0.1",
            "port": self.port,
            "storage": str(self.storage),
            "completion": {"quiet_seconds": 1.0},
            "log_level": "INFO",
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.settings = cfg
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self, timeout: float = 30) -> NodeProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if b"ready on" in self.log_path.read_bytes():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"node did not start within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return int(self.proc.returncode)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def status(self) -> dict[str, Any]:
        import json

        out = subprocess.run(
            [sys.executable, "-m", "dicomnode", "status", "--json", "--config",
             str(self.config_path)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return dict(json.loads(out.stdout))

    def wait_for(self, predicate: Any, timeout: float = 30, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout} s; node log:\n{self.log()}")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (and always stop) nodes: ``node_factory(settings).start()``."""
    nodes: list[NodeProcess] = []

    def make(settings: dict[str, Any] | None = None, name: str = "node") -> NodeProcess:
        workdir = tmp_path / f"{name}{len(nodes)}"
        workdir.mkdir()
        node = NodeProcess(workdir, settings)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.kill9()


@pytest.fixture
def node(node_factory: Any) -> NodeProcess:
    """A started node with the default test settings."""
    return node_factory().start()  # type: ignore[no-any-return]
