"""``dicomnode demo``: a first result for someone with no chest CT at hand.

Writes the synthetic chest phantom (:mod:`dicomnode.phantom`, no patient data) to a
temporary folder, sends it with the node's own C-STORE sender (the same as
``dicomnode send``) to a node (by default this configuration's own address), removes
the folder, and says where to look: the node's status page and the OHIF link of the
study (:func:`dicomnode.web.viewer.study_link`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import NodeConfig
from dicomnode.export.dimse import DimseSender, Peer, scan

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    study_uid: str
    instances: int
    sent: int
    failed: list[tuple[Path, str]]
    seconds_to_make: float
    seconds_to_send: float


def own_address(config: NodeConfig) -> Peer:
    """Where this configuration's node listens, as a sender on this machine reaches it."""
    host = config.bind_address
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return Peer(config.ae_title, host, int(config.port))


def http_root(config: NodeConfig) -> str | None:
    """The node's HTTP root as a browser on this machine reaches it (None when off)."""
    hc = config.http
    if not hc.enabled:
        return None
    if hc.public_url:
        return hc.public_url.rstrip("/").removesuffix("/dicom-web")
    host = hc.bind_address
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if hc.certfile is not None else "http"
    return f"{scheme}://{host}:{hc.port}"


def run_demo(to: Peer, *, calling_ae: str = "DEMO", n_slices: int = 120, size: int = 256,
             seed: int = 0) -> DemoResult:
    """Make the phantom in a temporary folder and send it to ``to``."""
    from dicomnode.phantom import make_chest_phantom

    with tempfile.TemporaryDirectory(prefix="dicomnode-demo-") as tmp:
        started = time.perf_counter()
        paths = make_chest_phantom(Path(tmp), n_slices=n_slices, rows=size, cols=size,
                                   seed=seed)
        made = time.perf_counter() - started
        files, skipped = scan(paths)
        if skipped:  # our own files: never expected
            raise RuntimeError(f"the phantom wrote unreadable files: {skipped[:3]}")
        import pydicom

        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        started = time.perf_counter()
        report = DimseSender(to, calling_ae).send(files)
        sent_in = time.perf_counter() - started
    return DemoResult(study_uid, len(paths), report.sent, list(report.failed), made, sent_in)


__all__ = ["DemoResult", "http_root", "own_address", "run_demo"]
