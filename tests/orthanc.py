"""A real Orthanc on loopback for integration tests (DIMSE C-STORE SCP and DICOMweb).

``OrthancServer`` writes its own configuration (storage in the test's folder, HTTP and
DICOM on free 127.0.0.1 ports, no remote access, no authentication, the DICOMweb plugin
when installed), starts Orthanc with ``TCP_NODELAY=1`` in its environment, waits until
``/system`` answers, and offers small REST helpers. ``stop()`` / ``start()`` simulate an
outage on the same storage and ports. The ``orthanc`` fixture always stops it.

Use it from a test module with ``from orthanc import OrthancServer, orthanc  # noqa``
(the tests folder is on ``sys.path``, as for ``conftest``); the fixture skips the test
when Orthanc is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

LOG = logging.getLogger(__name__)

AE_TITLE = "ORTHANC"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def _free_port(taken: Iterable[int] = ()) -> int:
    avoid = set(taken)
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


def orthanc_binary() -> str | None:
    """The path of the ``Orthanc`` executable, or None."""
    return shutil.which("Orthanc")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or None when ``orthanc-dicomweb`` is absent."""
    for folder in PLUGIN_DIRS:
        path = folder / DICOMWEB_PLUGIN
        if path.is_file():
            return path
    return None


class OrthancError(RuntimeError):
    """Orthanc did not start, stopped unexpectedly or answered a request with an error."""


class OrthancServer:
    """One Orthanc process with a configuration written by the test.

    ``modalities`` maps a symbolic name to ``(ae_title, host, port)`` for
    ``DicomModalities`` (e.g. the node under test, for ``send_to_modality``).
    ``dicomweb``: load the DICOMweb plugin (when installed; see :attr:`has_dicomweb`).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = True,
        ae_title: str = AE_TITLE,
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port = _free_port()
        self.http_port = _free_port((self.dicom_port,))
        self.host = "127.0.0.1"
        self.plugin = dicomweb_plugin() if dicomweb else None
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- configuration -----------------------------------------------------------------

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "OverwriteInstances": False,
            "SaveJobs": False,
            "LuaScripts": [],
            "Plugins": [str(self.plugin)] if self.plugin else [],
        }
        if self.plugin:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    @property
    def has_dicomweb(self) -> bool:
        """True when the DICOMweb plugin is loaded (STOW-RS at :attr:`dicomweb_url`)."""
        return self.plugin is not None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, e.g. ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.base_url}/dicom-web"

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> OrthancServer:
        """Start Orthanc (same storage and ports as before) and wait until it answers."""
        if self.running:
            return self
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system", timeout=2)
            except (OSError, OrthancError):
                time.sleep(0.05)
                continue
            if self._dicom_listening():
                LOG.info("Orthanc up: DICOM %d, HTTP %d", self.dicom_port, self.http_port)
                return self
            time.sleep(0.05)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout} s:\n{self.log()}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM Orthanc and wait; SIGKILL if it does not exit in ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("Orthanc did not stop in %.0f s: killed", timeout)
                proc.kill()
                proc.wait()

    def log(self, tail: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        """One REST call; returns the decoded JSON answer (or the raw bytes)."""
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                kind = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        if "json" in kind and data:
            return json.loads(data)
        return data

    def get(self, path: str, timeout: float = 30) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return list(self.get("/instances"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def find(self, sop_instance_uid: str) -> list[str]:
        """Orthanc IDs of the instances with this SOP Instance UID (0 or 1 of them)."""
        return list(
            self.post(
                "/tools/find",
                {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
            )
        )

    def has(self, sop_instance_uid: str) -> bool:
        return bool(self.find(sop_instance_uid))

    def file(self, orthanc_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        data = self.get(f"/instances/{orthanc_id}/file")
        assert isinstance(data, bytes)
        return data

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a Part 10 file through REST (``POST /instances``)."""
        return dict(
            self.request(
                "POST", "/instances", Path(path).read_bytes(), content_type="application/dicom"
            )
        )

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality at run time (kept in memory only)."""
        self.request(
            "PUT",
            f"/modalities/{urllib.parse.quote(name)}",
            json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode(),
        )
        self.modalities[name] = (ae_title, host, port)

    def send_to_modality(self, modality: str, resources: Sequence[str]) -> Any:
        """C-STORE the given Orthanc resources (IDs) to a declared modality, synchronously."""
        return self.post(
            f"/modalities/{urllib.parse.quote(modality)}/store",
            {"Resources": list(resources), "Synchronous": True},
        )

    def wait_for_count(self, n: int, timeout: float = 30, interval: float = 0.05) -> int:
        """Wait until Orthanc holds at least ``n`` instances; returns the count."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = self.count_instances()
            if count >= n:
                return count
            time.sleep(interval)
        raise AssertionError(f"Orthanc holds {count} instances, not {n}, after {timeout} s")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A started Orthanc (DICOMweb plugin when installed), always stopped afterwards."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = OrthancServer(tmp_path / "orthanc")
    try:
        server.start()
        yield server
    finally:
        server.stop()
