"""The smaller holes of issue 14, each with a real peer where there is one: validator
messages without patient values, completion retried after a full disk, a changed
re-send under a held SOP Instance UID refused (0x0111), owner-only files under umask
022, world-readable TLS keys refused."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from conftest import (
    ROOT,
    dataset_bytes,
    index_query,
    make_series,
    run_cli,
    stored_path,
    storescu,
    uids,
)
from tmpfs import fill, small_tmpfs

from dicomnode.config import CompletionConfig, parse_config
from dicomnode.core.index import Completion, Index, InstanceRecord
from dicomnode.ingest.completion import CompletionTracker
from dicomnode.ingest.spool import Spool
from dicomnode.queue.base import JobState
from dicomnode.queue.sqlite import SQLiteJobQueue
from dicomnode.worker.inference import InferenceWorker
from dicomnode.worker.pool import ModelPool

SECRET = "SECRETNAME~VALUE"


def test_validator_errors_name_the_tag_never_the_value(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A real job whose SEG fails dciodvfy (the source's Patient's Name is too long): the
    job's last_error and the log say which attribute and what is wrong, not the name."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (make test installs it)")
    from test_worker import _ingest

    from dicomnode.synthetic import make_ct_series

    files = make_ct_series(tmp_path / "ct", 24, 96, 96)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName = SECRET * 5  # 80 characters: longer than PN allows (64)
        ds.save_as(f)
    storage = tmp_path / "storage"
    config = parse_config({"storage": str(storage), "inference": {"max_attempts": 1},
                           "destinations": [{"name": "pacs", "ae_title": "PACS",
                                             "host": "127.0.0.1", "port": 104,
                                             "objects": ["seg"]}]})
    spool, index = Spool(storage), Index(Index.path_for(storage))
    study, series = _ingest(spool, index, files)
    queue = SQLiteJobQueue(SQLiteJobQueue.path_for(storage))
    job = queue.add("k", "lung_density", {"study_uid": study, "revision": 1,
                                          "series_uid": series, "rule": "r",
                                          "destinations": ["pacs"]}, max_attempts=1)
    worker = InferenceWorker(config, index, queue, ModelPool(ROOT / "models", "cpu"), owner="w")
    with caplog.at_level(logging.DEBUG):
        worker.run_job(queue.acquire("w", 60)[0])
    done = queue.get(job.id)
    assert done is not None and done.state is JobState.FAILED
    error = done.last_error or ""
    assert "(0x0010,0x0010) PN Patient's Name" in error and "Length invalid" in error, error
    assert "SECRETNAME" not in error
    assert "(0x0010,0x0010)" in caplog.text and "SECRETNAME" not in caplog.text
    raw = (storage / "jobs.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in storage.glob("jobs.sqlite3-*"))
    assert b"SECRETNAME" not in raw
    queue.close()
    index.close()


def test_completion_is_retried_after_the_database_was_full(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """The quiet timer fires while the index's disk is full ("database or disk is
    full"); once space is back the study completes without a restart."""
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        index = Index(fs / "index.sqlite3")
        study = "1.2.3.4"
        for i in range(3):
            index.add_instance(InstanceRecord(f"1.2.3.4.5.{i}", "1.2.840.10008.5.1.4.1.1.2", study,
                                              "1.2.3.4.5", "1.2.840.10008.1.2.1", "CT", 10,
                                              time.time(), f"studies/x/{i}.dcm"))
        got: list[Completion] = []
        arrived = threading.Event()

        class Sink:
            def study_completed(self, completion: Completion) -> None:
                got.append(completion)
                arrived.set()

        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.start()
        filler = fill(fs)
        tracker = CompletionTracker(CompletionConfig(quiet_seconds=0.3), index, scheduler, Sink())
        try:
            with caplog.at_level(logging.WARNING, logger="dicomnode.ingest.completion"):
                tracker.start()
                deadline = time.monotonic() + 10
                while "database or disk is full" not in caplog.text:
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.05)
                assert not got and "trying again in" in caplog.text
                filler.unlink()
                assert arrived.wait(20), "the study never completed after space came back"
            assert [(c.study_uid, c.revision, c.instance_count) for c in got] == [(study, 1, 3)]
            deadline = time.monotonic() + 5  # the hand-off is marked right after the sink
            while index.pending_handoffs():
                assert time.monotonic() < deadline, "the hand-off was never marked"
                time.sleep(0.05)
        finally:
            tracker.stop()
            scheduler.shutdown(wait=True)
            index.close()


def _stow(port: int, path: Path) -> tuple[int, dict[str, Any]]:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/dicom-web/studies", body, {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def test_resend_with_same_uid_and_other_content_is_refused(node_factory: Any,
                                                           tmp_path: Path) -> None:
    node = node_factory().start()
    files = make_series(tmp_path / "s", n=2, size=32, seed=5)
    original = files[0]
    assert storescu(node.port, files).returncode == 0
    target = stored_path(node.storage, *uids(original))
    held = target.read_bytes()

    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(original)
    ds.SeriesDescription = "corrected in place"  # same SOP Instance UID, other content
    ds.save_as(changed)
    out = storescu(node.port, [changed], extra=["-v"])
    text = out.stdout + out.stderr
    # DCMTK names no C-STORE status 0x0111 ("Unknown Status: 0x111"): a failure all the same
    assert "Received Store Response (Unknown Status: 0x111)" in text, text
    assert "same SOP Instance UID, other content" not in text  # the log line is the node's
    assert "other content is held already" in node.log()
    status, body = _stow(node.http_port, changed)
    assert status == 409, body
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]
    assert target.read_bytes() == held  # the held instance is kept as it was

    # the same content again, as it was, and re-encoded in another transfer syntax: Success
    assert storescu(node.port, [original], extra=["-v"]).returncode == 0
    again = storescu(node.port, [original], extra=["-v", "-xi"])  # Implicit VR on the wire
    assert again.returncode == 0 and "Success" in again.stdout + again.stderr
    status, body = _stow(node.http_port, original)
    assert status == 200, body
    implicit = tmp_path / "implicit.dcm"  # the same content, re-encoded, over STOW-RS
    ds = pydicom.dcmread(original)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    status, body = _stow(node.http_port, implicit)
    assert status == 200, body
    assert dataset_bytes(target) == dataset_bytes(original)
    rows = index_query(node.storage, "SELECT count(*) FROM instances")[0][0]
    assert rows == len(files)
    assert node.stop() == 0


def test_files_are_owner_only_under_umask_022(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    previous = os.umask(0o022)  # what `make run` inherits from a login shell
    try:
        node.start()
    finally:
        os.umask(previous)
    files = make_series(tmp_path / "s", n=3, size=32)
    assert storescu(node.port, files).returncode == 0
    assert _stow(node.http_port, make_series(tmp_path / "w", n=1, size=32, seed=9)[0])[0] == 200
    assert node.stop() == 0
    seen = [node.storage, *node.storage.rglob("*")]
    names = {p.name for p in seen}
    assert {"index.sqlite3", "studies", "audit", "keys"} <= names
    loose = [f"{p.relative_to(node.storage.parent)} {stat.filemode(p.stat().st_mode)}"
             for p in seen if p.stat().st_mode & 0o077]
    assert not loose, loose


def _key_pair(folder: Path, mode: int) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "node.crt", folder / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(mode)
    return cert_path, key_path


@pytest.mark.parametrize("where", ["http", "ingest.tls"])
def test_world_readable_tls_key_is_refused(node_factory: Any, tmp_path: Path,
                                           where: str) -> None:
    cert, key = _key_pair(tmp_path / "pki", 0o644)
    tls = {"certfile": str(cert), "keyfile": str(key)}
    settings = {"http": tls} if where == "http" else {"ingest": {"tls": {**tls, "port": 0}}}
    if where == "ingest.tls":
        from conftest import free_port
        settings["ingest"]["tls"]["port"] = free_port()  # type: ignore[index]
    node = node_factory(settings)
    check = run_cli("config", "check", str(node.config_path))
    assert check.returncode == 2 and f"{where}.keyfile" in check.stderr, check.stderr
    with pytest.raises(RuntimeError) as info:
        node.start()
    text = str(info.value)
    assert f"{where}.keyfile" in text and "chmod 600" in text and "-rw-r--r--" in text, text
    key.chmod(0o600)
    node.start()  # the same key, owner-only: accepted
    assert node.stop() == 0
