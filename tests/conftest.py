"""Shared fixtures: a real node in a subprocess, DCMTK peers, test data.

Everything talks over 127.0.0.1 on ephemeral ports, and every process a test
starts is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import re
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


_SENDING = re.compile(r"Sending file: (.+)$")


def acknowledged(storescu_output: str) -> list[Path]:
    """Files for which ``storescu -v`` received a Success response, in the order sent
    (it prints "Sending file: F" before each C-STORE and "Received Store Response
    (Success)" after the answer)."""
    acked: list[Path] = []
    current: Path | None = None
    for line in storescu_output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def kill9_mid_storescu(node: NodeProcess, files: list[Path], log: Path, reached: Any, *,
                       aet: str = "STORESCU", timeout: float = 60) -> tuple[int, list[Path]]:
    """Send ``files`` with ``storescu -v`` (its output to ``log``) and kill -9 the node
    as soon as ``reached()`` is true (or storescu has ended). Returns storescu's exit
    status and the files the node acknowledged before it died."""
    need_tool("storescu")
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["storescu", "-v", "-aet", aet, "-aec", "DICOMNODE", "127.0.0.1",
             str(node.port), *map(str, files)], env=DCMTK_ENV, stdout=out,
            stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not reached() and proc.poll() is None:
                assert time.monotonic() < deadline, "transfer stalled"
                time.sleep(0.002)
            node.kill9()
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, acknowledged(log.read_text(errors="replace"))


class NodeProcess:
    """``dicomnode serve`` in a subprocess with a config written by the test."""

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.config_path = workdir / "node.yaml"
        self.log_path = workdir / "node.log"
        cfg: dict[str, Any] = {
            "ae_title": "DICOMNODE",
            "bind_address": "127.0.0.1",
            "port": self.port,
            "storage": str(self.storage),
            "completion": {"quiet_seconds": 1.0},
            "http": {"port": self.http_port},
            # no model unless a test routes one (the embedded default rule would run the lung
            # model on every chest CT)
            "routing": [],
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
        # the log is appended to across restarts: look for "ready on" only in new output
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
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
            if b"ready on" in self.log_path.read_bytes()[offset:]:
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


# -- helpers shared by the integration tests ---------------------------------------------

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

# storescu option that proposes exactly this transfer syntax first (use with -R), so that
# DCMTK sends each file in its own encoding instead of converting it.
STORESCU_TS_OPTION = {
    IMPLICIT_LE: "-xi",
    EXPLICIT_LE: "-xe",
    EXPLICIT_BE: "-xb",
    DEFLATED_LE: "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def dataset_offset(path: Path) -> int:
    """Byte offset where the dataset starts (after preamble and File Meta Information)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with Path(path).open("rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.tell()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file: every byte after the File Meta Information."""
    offset = dataset_offset(path)
    with Path(path).open("rb") as f:
        f.seek(offset)
        return f.read()


def file_meta(path: Path) -> Any:
    from pydicom.filereader import read_file_meta_info

    return read_file_meta_info(path)


def index_query(storage: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run a read-only query on the node's index (works while the node runs)."""
    import sqlite3

    db = Path(storage) / "index.sqlite3"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def stored_files(storage: Path) -> list[Path]:
    """Every instance file under storage/studies."""
    studies = Path(storage) / "studies"
    return sorted(p for p in studies.rglob("*") if p.is_file()) if studies.exists() else []


def stored_path(storage: Path, study: str, series: str, sop: str) -> Path:
    return Path(storage) / "studies" / study / series / f"{sop}.dcm"


def study_state(node: NodeProcess, study_uid: str) -> dict[str, Any] | None:
    for s in node.status()["studies"]:
        if s["study_uid"] == study_uid:
            return dict(s)
    return None


def completions(storage: Path, study_uid: str | None = None) -> list[tuple[Any, ...]]:
    """(study_uid, revision, reason, instance_count) of each recorded completion."""
    sql = "SELECT study_uid, revision, reason, instance_count FROM completions"
    if study_uid is None:
        return index_query(storage, sql + " ORDER BY id")
    return index_query(storage, sql + " WHERE study_uid = ? ORDER BY id", (study_uid,))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *, aec: str = "DICOMNODE", aet: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    need_tool("echoscu")
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "-to", "10", "127.0.0.1", str(port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def assert_alive(node: NodeProcess) -> None:
    """The node process runs and answers C-ECHO."""
    assert node.proc is not None and node.proc.poll() is None, f"node died:\n{node.log()[-4000:]}"
    r = echoscu(node.port)
    assert r.returncode == 0, f"node does not answer C-ECHO: {r.stderr}\n{node.log()[-4000:]}"


def unique_rounds(files: list[Path], key: Any) -> list[list[Path]]:
    """Split ``files`` into rounds in which ``key(file)`` (e.g. the SOP Instance UID) is unique."""
    rounds: list[tuple[set[Any], list[Path]]] = []
    for f in files:
        k = key(f)
        for keys, members in rounds:
            if k not in keys:
                keys.add(k)
                members.append(f)
                break
        else:
            rounds.append(({k}, [f]))
    return [members for _, members in rounds]


class ReferenceSCP:
    """DCMTK storescp in bit-preserving mode: writes each dataset exactly as received.

    The oracle for "what did the SCU put on the wire" (storescu re-encodes what it reads,
    e.g. undefined-length sequences become defined-length).
    """

    def __init__(self, outdir: Path) -> None:
        need_tool("storescp")
        self.outdir = outdir
        outdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = outdir.parent / f"storescp-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "REFSCP", "+B", "+xa", "-od", str(outdir), str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=DCMTK_ENV,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if echoscu(self.port, aec="REFSCP").returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("storescp did not start")

    def find(self, sop_uid: str) -> Path | None:
        hits = [p for p in self.outdir.iterdir() if p.name.endswith("." + sop_uid)
                or p.name.endswith("." + sop_uid + ".dcm")]
        return hits[0] if hits else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def reference_scp(tmp_path: Path) -> Iterator[ReferenceSCP]:
    scp = ReferenceSCP(tmp_path / "reference-scp")
    yield scp
    scp.stop()


def make_series(out_dir: Path, n: int = 10, size: int = 64, **kwargs: Any) -> list[Path]:
    from dicomnode.synthetic import make_ct_series

    return make_ct_series(out_dir, n_slices=n, rows=size, cols=size, **kwargs)


def uids(path: Path) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of a DICOM file."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
