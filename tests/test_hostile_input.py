"""Malformed and hostile instances over the wire: the node never crashes, and each one
is either refused with a failure status or stored exactly as it was sent.

The files are sent with pynetdicom as a raw-bytes SCU (it proposes the file's SOP class
and transfer syntax and streams the dataset bytes untouched, so even files DCMTK
refuses to read reach the node), then with DCMTK storescu where it can read them.
GPL data in ../shared/data/orthanc-tests is read in place, never copied here.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    SHARED_DATA,
    STORESCU_TS_OPTION,
    NodeProcess,
    assert_alive,
    dataset_bytes,
    dicom_files,
    index_query,
    make_series,
    storescu,
)
from pydicom import config as pydicom_config
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid

HOSTILE_FOLDERS = [
    "pydicom-test-files/malformed-and-edge-cases",
    "orthanc-tests/malformed-and-edge-cases",
]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _files() -> list[Path]:
    out: list[Path] = []
    for folder in HOSTILE_FOLDERS:
        if (SHARED_DATA / folder).exists():
            out += dicom_files(SHARED_DATA / folder)
    return out


FILES = _files()
IDS = [p.name for p in FILES]


# -- building what goes on the wire --------------------------------------------------------


def _guess_syntax(data: bytes) -> str:
    """Transfer syntax of a raw dataset without file meta, from its first element."""
    little = data[0] != 0 or data[1] == 0
    explicit = data[4:6].isalpha() and data[4:6].isupper()
    if not little:
        return EXPLICIT_BE
    return EXPLICIT_LE if explicit else IMPLICIT_LE


def _payload(src: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, dataset bytes) to send for ``src``."""
    raw = src.read_bytes()
    if raw[128:132] == b"DICM":
        meta = pydicom.filereader.read_file_meta_info(src)
        data = dataset_bytes(src)
        ts = str(meta.get("TransferSyntaxUID") or _guess_syntax(data))
        sop_class = str(meta.get("MediaStorageSOPClassUID") or "")
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID") or "")
    else:
        data, ts, sop_class, sop_uid = raw, _guess_syntax(raw), "", ""
    if not sop_class or not sop_uid:
        try:
            ds = pydicom.filereader.read_dataset(
                io.BytesIO(data), ts == IMPLICIT_LE, ts != EXPLICIT_BE,
                stop_when=lambda tag, vr, length: tag > 0x00080018,
            )
            sop_class = sop_class or str(ds.get("SOPClassUID", "") or "")
            sop_uid = sop_uid or str(ds.get("SOPInstanceUID", "") or "")
        except Exception:
            pass
    return sop_class or SECONDARY_CAPTURE, sop_uid or generate_uid(), ts, data


def _write_part10(path: Path, sop_class: str, sop_uid: str, ts: str, data: bytes) -> Path:
    """A Part 10 file with our own (well-formed) meta around the given dataset bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.3.4"
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    path.write_bytes(buf.getvalue() + data)
    return path


def send_raw(port: int, path: Path, *, aec: str = "DICOMNODE") -> int | None:
    """C-STORE the Part 10 file ``path`` byte for byte; the status, or None without one."""
    from pynetdicom import AE, _config

    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="HOSTILESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established, "association refused"
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def is_failure(code: int) -> bool:
    return (code & 0xF000) in (0xA000, 0xC000) or (code & 0xFF00) == 0x0100


def _stored_for(storage: Path, sop_uid: str) -> Path | None:
    rows = index_query(storage, "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    return storage / rows[0][0] if rows else None


# -- the node pool: one node per round of distinct SOP Instance UIDs --------------------------


@pytest.fixture(scope="module")
def hostile_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not FILES:
        pytest.skip(f"shared test data not available under {SHARED_DATA}")
    nodes: dict[int, NodeProcess] = {}
    seen: dict[int, set[str]] = {}

    def node_for(sop_uid: str) -> NodeProcess:
        n = 0
        while sop_uid in seen.setdefault(n, set()):
            n += 1
        seen[n].add(sop_uid)
        if n not in nodes:
            workdir = tmp_path_factory.mktemp(f"hostile{n}")
            nodes[n] = NodeProcess(workdir, {"completion": {"quiet_seconds": 60}}).start()
        return nodes[n]

    yield node_for
    for node in nodes.values():
        code = node.stop()
        assert code == 0, f"node exited with {code}:\n{node.log()[-4000:]}"


@pytest.mark.parametrize("src", FILES, ids=IDS)
def test_hostile_file_refused_or_stored_intact(hostile_nodes: Any, src: Path,
                                               tmp_path: Path) -> None:
    sop_class, sop_uid, ts, data = _payload(src)
    node = hostile_nodes(sop_uid)
    wire = _write_part10(tmp_path / "wire.dcm", sop_class, sop_uid, ts, data)

    code = send_raw(node.port, wire)
    assert_alive(node)
    assert code is not None, f"no C-STORE response for {src.name}:\n{node.log()[-3000:]}"
    stored = _stored_for(node.storage, sop_uid)
    if is_failure(code):
        assert stored is None, f"refused with 0x{code:04X} but indexed"
    else:
        assert code == 0 or (code & 0xF000) == 0xB000, f"unexpected status 0x{code:04X}"
        assert stored is not None and stored.is_file(), "success but not stored"
        assert dataset_bytes(stored) == data, "stored bytes differ from what was sent"
        assert str(pydicom.filereader.read_file_meta_info(stored).TransferSyntaxUID) == ts
    assert not list((node.storage / "tmp").iterdir()), "partial files left in storage/tmp"


def test_hostile_files_via_storescu_do_not_crash(node_factory: Any) -> None:
    """DCMTK as the peer, for the hostile files it can read at all."""
    if not FILES:
        pytest.skip(f"shared test data not available under {SHARED_DATA}")
    node = node_factory({"completion": {"quiet_seconds": 60}}).start()
    for src in FILES:
        if src.read_bytes()[128:132] != b"DICM":
            continue
        meta = pydicom.filereader.read_file_meta_info(src)
        opt = STORESCU_TS_OPTION.get(str(meta.get("TransferSyntaxUID", "")))
        r = storescu(node.port, [src], extra=["-R", opt] if opt else ["-R"], timeout=60)
        assert_alive(node)
        if r.returncode == 0:
            # storescu reports success only when the node answered Success; it sends the
            # dataset's SOP Instance UID, which may differ from the file meta's
            candidates = {str(meta.get("MediaStorageSOPInstanceUID", ""))}
            try:
                ds = pydicom.dcmread(src, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                candidates.add(str(ds.get("SOPInstanceUID", "")))
            except Exception:
                pass
            assert any(_stored_for(node.storage, uid) for uid in candidates if uid), src.name
    assert node.stop() == 0


# -- UIDs that try to leave the storage folder -------------------------------------------------


BAD_UIDS = [
    ("sop", "../../../../escaped"),
    ("sop", "1.2.3/../../../escaped"),
    ("sop", "1.2.840.abc"),
    ("sop", "/tmp/escaped"),
    ("study", "1.2.3\\..\\..\\escaped"),  # backslash: a multi-valued UI
    ("study", "../../../escaped"),
    ("series", "1.2/../../../../escaped"),
    ("dataset-sop", "../../../escaped"),  # the command's UID is fine, the dataset's is not
]


@pytest.fixture(autouse=True)
def _quiet_invalid_uid_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        yield


def _snapshot(root: Path) -> set[Path]:
    return {Path(dp) / f for dp, dirs, files in os.walk(root) for f in files + dirs}


@pytest.mark.parametrize("where,bad", BAD_UIDS, ids=[f"{w}:{b}" for w, b in BAD_UIDS])
def test_path_traversal_uids_refused(node_factory: Any, tmp_path: Path, where: str,
                                     bad: str) -> None:
    node = node_factory().start()
    src = make_series(tmp_path / "src", n=1, size=16)[0]
    ds = pydicom.dcmread(src)
    command_uid = ds.SOPInstanceUID
    if where == "sop":
        ds.SOPInstanceUID = command_uid = bad
    elif where == "dataset-sop":
        ds.SOPInstanceUID = bad
    elif where == "study":
        ds.StudyInstanceUID = bad
    else:
        ds.SeriesInstanceUID = bad
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        pydicom.filewriter.write_dataset(buf, ds)
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    wire = _write_part10(tmp_path / "src" / "wire.dcm", ds.SOPClassUID, command_uid,
                         EXPLICIT_LE, buf.getvalue())

    assert_alive(node)
    watched = tmp_path.parent  # the test's whole temp area, the node's workdir included
    before = _snapshot(watched)
    code = send_raw(node.port, wire)
    assert code is not None and is_failure(code), f"status {code!r} for UID {bad!r}"
    assert_alive(node)
    new = {p for p in _snapshot(watched) - before
           if p.name not in ("index.sqlite3-wal", "index.sqlite3-shm")}
    assert new == set(), f"files created: {sorted(map(str, new))}"
    assert index_query(node.storage, "SELECT count(*) FROM instances")[0][0] == 0
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert node.stop() == 0
