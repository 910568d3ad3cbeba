"""Every transfer syntax in the shared samples is accepted and stored as sent.

Two senders per file: the project's own SCU (`dicomnode send`, which proposes exactly
the file's transfer syntax and streams the file's bytes), and DCMTK storescu with
``-R`` plus the option proposing the file's own syntax (so that DCMTK is the peer for
compressed syntaxes too). storescu re-encodes what it reads, so its oracle is a
bit-preserving DCMTK storescp that received the same send.

Files sharing a SOP Instance UID (the same image in several encodings) are sent to
different nodes, since the node stores each SOP instance once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    SHARED_DATA,
    STORESCU_TS_OPTION,
    NodeProcess,
    ReferenceSCP,
    dataset_bytes,
    dicom_files,
    file_meta,
    index_query,
    run_cli,
    stored_path,
    storescu,
    uids,
    unique_rounds,
)

FOLDERS = [
    "nema-wg04-compression-samples",
    "rordenlab-dcm_qa_ts",
    "pydicom-test-files/transfer-syntaxes",
]


def _files() -> list[Path]:
    out: list[Path] = []
    for folder in FOLDERS:
        path = SHARED_DATA / folder
        if path.exists():
            out += dicom_files(path)
    return out


FILES = _files()
IDS = [str(p.relative_to(SHARED_DATA)) for p in FILES]


def _sop(path: Path) -> str:
    return str(file_meta(path).MediaStorageSOPInstanceUID)


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, dict[str, Any]]:
    """Send every file both ways; returns, per file, where each copy ended up."""
    if not FILES:
        pytest.skip(f"shared test data not available under {SHARED_DATA}")
    results: dict[Path, dict[str, Any]] = {}
    for n, group in enumerate(unique_rounds(FILES, _sop)):
        root = tmp_path_factory.mktemp(f"round{n}")
        cli_node = NodeProcess(_mkdir(root / "cli-node"), {"completion": {"quiet_seconds": 60}})
        dcmtk_node = NodeProcess(_mkdir(root / "dcmtk-node"), {"completion": {"quiet_seconds": 60}})
        ref = ReferenceSCP(root / "reference")
        try:
            cli_node.start()
            dcmtk_node.start()
            cli = run_cli("send", *map(str, group), "--to",
                          f"DICOMNODE@127.0.0.1:{cli_node.port}", "--quiet")
            for f in group:
                ts = str(file_meta(f).TransferSyntaxUID)
                opts = ["-R", STORESCU_TS_OPTION[ts]] if ts in STORESCU_TS_OPTION else ["-R"]
                results[f] = {
                    "cli": cli,
                    "cli_storage": cli_node.storage,
                    "dcmtk": storescu(dcmtk_node.port, [f], extra=opts),
                    "dcmtk_ref": storescu(ref.port, [f], aec="REFSCP", extra=opts),
                    "dcmtk_storage": dcmtk_node.storage,
                    "ref": ref,
                }
        finally:
            assert cli_node.stop() == 0
            assert dcmtk_node.stop() == 0
            ref.stop()
    return results


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def _indexed(storage: Path, src: Path) -> list[tuple[Any, ...]]:
    return index_query(storage, "SELECT transfer_syntax FROM instances WHERE sop_instance_uid = ?",
                       (_sop(src),))


def _has_study_and_series(src: Path) -> bool:
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    return bool(ds.get("StudyInstanceUID")) and bool(ds.get("SeriesInstanceUID"))


def _stored(storage: Path, src: Path) -> Path:
    out = stored_path(storage, *uids(src))
    assert out.is_file(), f"{src.name} was not stored (expected {out})"
    return out


@pytest.mark.parametrize("src", FILES, ids=IDS)
def test_project_scu_stores_exact_bytes(received: dict[Path, dict[str, Any]], src: Path) -> None:
    r = received[src]
    if not _has_study_and_series(src):
        # not a valid instance (Study/Series Instance UID are type 1): refused, not stored
        assert f"failed {src}: status 0xC000" in r["cli"].stderr, r["cli"].stderr
        assert _indexed(r["cli_storage"], src) == []
        return
    assert f"failed {src}" not in r["cli"].stderr, r["cli"].stderr
    out = _stored(r["cli_storage"], src)
    ts = str(file_meta(src).TransferSyntaxUID)
    assert str(file_meta(out).TransferSyntaxUID) == ts
    assert dataset_bytes(out) == dataset_bytes(src)
    assert _indexed(r["cli_storage"], src) == [(ts,)]


@pytest.mark.parametrize("src", FILES, ids=IDS)
def test_storescu_own_syntax_stored_as_sent(received: dict[Path, dict[str, Any]],
                                            src: Path) -> None:
    r = received[src]
    if r["dcmtk_ref"].returncode != 0:
        pytest.skip(f"DCMTK storescu cannot send this file even to storescp: "
                    f"{r['dcmtk_ref'].stderr.strip()[-300:]}")
    if not _has_study_and_series(src):
        assert r["dcmtk"].returncode != 0  # refused with a failure status
        assert _indexed(r["dcmtk_storage"], src) == []
        return
    assert r["dcmtk"].returncode == 0, r["dcmtk"].stderr
    out = _stored(r["dcmtk_storage"], src)
    ts = str(file_meta(src).TransferSyntaxUID)
    assert str(file_meta(out).TransferSyntaxUID) == ts
    wire = r["ref"].find(uids(src)[2])
    assert wire is not None
    assert dataset_bytes(out) == dataset_bytes(wire)
    # and what DCMTK sent is the source, element for element (DCMTK drops Dataset
    # Trailing Padding and group lengths, and writes encapsulated Pixel Data as OB)
    a = _without_padding(pydicom.dcmread(src))
    b = _without_padding(pydicom.dcmread(out))
    assert list(a.keys()) == list(b.keys())
    for tag in a.keys():
        assert a[tag].value == b[tag].value, f"{tag} differs"


def _without_padding(ds: pydicom.Dataset) -> pydicom.Dataset:
    for tag in [t for t in ds.keys() if t == 0xFFFCFFFC or t.element == 0]:
        del ds[tag]
    return ds
