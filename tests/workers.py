"""Remote workers for integration tests: ``dicomnode worker`` processes and their node.

``WorkerProcess`` runs ``python -m dicomnode worker --config W --storage S`` from a folder
of its own (its config, its own copy of the model folders, its storage), like a worker on
another machine: it shares nothing with the node but the broker URL, the node's HTTP
address and a token. ``celery_node_settings`` makes the node's settings for a Celery queue.
``DicomReceiver`` is DCMTK storescp with unique file names, so that a result delivered
twice would show up twice. Every process is stopped by the fixture that made it.

Use it from a test module with ``from workers import ...`` (tests/ is on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import DCMTK_ENV, ROOT, echoscu, free_port, need_tool

WORKER_MODELS = Path(__file__).resolve().parent / "data" / "worker_models"
TOKEN = "test-worker-token-0123456789abcdef"


def token_sha256(token: str = TOKEN) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def copy_model(dest: Path, name: str = "air_threshold", delay: float | None = None) -> Path:
    """A copy of a test model folder under ``dest/models`` (``delay``: seconds per run)."""
    source = WORKER_MODELS / name if (WORKER_MODELS / name).is_dir() else ROOT / "models" / name
    target = dest / "models" / name
    shutil.copytree(source, target, dirs_exist_ok=True)
    if delay is not None:
        (target / "delay.txt").write_text(f"{delay}\n")
    return dest / "models"


def celery_node_settings(broker_url: str, models_dir: Path, receiver: Any | None = None, *,
                         model: str = "air_threshold", lease_seconds: float = 6.0,
                         visibility_timeout: float = 30.0,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "models_dir": str(models_dir),
        "queue": {"backend": "celery", "url": broker_url,
                  "visibility_timeout_seconds": visibility_timeout,
                  "worker_tokens": [{"name": "workers", "sha256": token_sha256()}]},
        "inference": {"lease_seconds": lease_seconds, "retry_backoff_seconds": 1.0,
                      "retry_backoff_max_seconds": 2.0, "max_attempts": 5},
        "routing": [{"name": "chest", "model": model,
                     "destinations": ["pacs"] if receiver is not None else [],
                     "match": {"modality": ["CT"]}}],
    }
    if receiver is not None:
        settings["destinations"] = [{"name": "pacs", "ae_title": receiver.ae_title,
                                     "host": "127.0.0.1", "port": receiver.port,
                                     "objects": ["seg", "sr"]}]
        settings["export"] = {"retry_base_seconds": 0.5, "retry_max_seconds": 2}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


class WorkerProcess:
    """One ``dicomnode worker`` in its own folder (config, models, storage)."""

    def __init__(self, folder: Path, broker_url: str, node_url: str, *,
                 model: str = "air_threshold", delay: float | None = None,
                 token: str = TOKEN, visibility_timeout: float = 30.0,
                 retry_seconds: float = 120.0, name: str | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.models_dir = copy_model(folder, model, delay)
        self.storage = folder / "storage"
        self.config_path = folder / "worker.yaml"
        self.log_path = folder / "worker.log"
        self.name = name or folder.name
        self.config_path.write_text(yaml.safe_dump({
            "queue": {"backend": "celery", "url": broker_url,
                      "visibility_timeout_seconds": visibility_timeout},
            "worker": {"node_url": node_url, "token": token, "models": [model],
                       "heartbeat_seconds": 1.0, "node_retry_seconds": retry_seconds,
                       "name": self.name},
            "models_dir": "models",  # relative: this worker's own copy
            "inference": {"device": "cpu"},
            "log_level": "INFO",
        }))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "worker", "--config", str(self.config_path),
             "--storage", str(self.storage)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder, env=env)
        return self

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        self.wait_log("consuming", timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 60, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"worker log has no {text!r} within {timeout} s:\n{self.log()}")

    def runs(self) -> int:
        """How many times a model finished a prediction in this worker."""
        return self.log().count(" ran in ")

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class DicomReceiver:
    """DCMTK storescp writing every object it receives to a file of its own (``-uf``)."""

    ae_title = "RECEIVER"

    def __init__(self, outdir: Path) -> None:
        need_tool("storescp")
        self.outdir = outdir
        outdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._log = (outdir.parent / f"receiver-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-uf", "-od", str(outdir), str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if echoscu(self.port, aec=self.ae_title).returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("storescp did not start")

    def received(self) -> dict[str, list[Path]]:
        """The files received, by modality (SEG, SR...)."""
        import pydicom

        out: dict[str, list[Path]] = {}
        for path in sorted(self.outdir.iterdir()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception:  # storescp is still writing it: not received yet
                continue
            out.setdefault(str(ds.Modality), []).append(path)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
