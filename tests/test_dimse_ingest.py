"""DIMSE ingest end to end: real DCMTK peers and the project's own SCU against a node
running in a subprocess, over 127.0.0.1."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import (
    DCMTK_ENV,
    EXPLICIT_LE,
    IMPLICIT_LE,
    completions,
    dataset_bytes,
    dicom_files,
    echoscu,
    file_meta,
    free_port,
    index_query,
    make_series,
    need_tool,
    run_cli,
    shared,
    stored_files,
    stored_path,
    storescu,
    study_state,
    uids,
)
from pydicom.uid import ImplicitVRLittleEndian

CT_STUDY = "1.3.6.1.4.1.14519.5.2.1.6655.2359.165554066086145834377508507990"
CT_SERIES = "1.3.6.1.4.1.14519.5.2.1.6655.2359.213534032021332276911485641315"


def _chest_ct() -> list[Path]:
    files = dicom_files(shared("tcia-lung-pet-ct-dx"))
    assert len(files) == 64
    return files


def _wait_complete(node: Any, study: str, revision: int = 1, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        s = study_state(node, study)
        return s if s and s["state"] == "complete" and s["revision"] >= revision else None

    return node.wait_for(done, timeout=timeout, interval=0.2)  # type: ignore[no-any-return]


def _assert_same_instance(src: Path, stored: Path) -> None:
    """Element for element (file meta aside) and pixel for pixel."""
    a = pydicom.dcmread(src)
    b = pydicom.dcmread(stored)
    assert str(b.file_meta.TransferSyntaxUID) == str(a.file_meta.TransferSyntaxUID)
    assert str(b.file_meta.MediaStorageSOPInstanceUID) == str(a.SOPInstanceUID)
    assert [e.tag for e in a] == [e.tag for e in b]
    for elem in a:
        assert b[elem.tag].value == elem.value, f"{src.name}: {elem.tag} differs"
    assert a == b
    if "PixelData" in a:
        assert np.array_equal(a.pixel_array, b.pixel_array)


# -- C-ECHO -----------------------------------------------------------------------------


def test_echoscu_and_cli_echo(node: Any) -> None:
    r = echoscu(node.port)
    assert r.returncode == 0, r.stderr
    r = run_cli("echo", "127.0.0.1", str(node.port), "--aec", "DICOMNODE", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "success" in r.stdout


def test_cli_echo_to_nothing_fails() -> None:
    r = run_cli("echo", "127.0.0.1", str(free_port()), "--aec", "DICOMNODE", "--timeout", "5",
                timeout=60)
    assert r.returncode != 0


# -- the real chest CT --------------------------------------------------------------------


def test_chest_ct_storescu_complete_and_intact(node_factory: Any, reference_scp: Any) -> None:
    """64 real CT slices via storescu: all indexed, each stored exactly as DCMTK sent it,
    equal to the source element for element and pixel for pixel; one completion."""
    files = _chest_ct()
    node = node_factory({"completion": {"quiet_seconds": 2.0}}).start()
    # -xi: propose the files' own transfer syntax (Implicit VR LE) so nothing is converted
    r = storescu(node.port, files, extra=["-xi"])
    assert r.returncode == 0, r.stderr + r.stdout
    # the same bytes to a bit-preserving DCMTK storescp: what storescu put on the wire
    ref = storescu(reference_scp.port, files, aec="REFSCP", extra=["-xi"])
    assert ref.returncode == 0, ref.stderr

    st = study_state(node, CT_STUDY)
    assert st is not None and st["instances"] == 64
    assert [s["series_uid"] for s in st["series"]] == [CT_SERIES]
    assert st["series"][0]["transfer_syntaxes"] == [IMPLICIT_LE]
    assert index_query(node.storage, "SELECT count(*) FROM instances")[0][0] == 64
    assert len(stored_files(node.storage)) == 64

    for src in files:
        study, series, sop = uids(src)
        out = stored_path(node.storage, study, series, sop)
        assert out.is_file(), f"{src.name} not stored at {out}"
        _assert_same_instance(src, out)
        wire = reference_scp.find(sop)
        assert wire is not None
        assert dataset_bytes(out) == dataset_bytes(wire), f"{src.name}: bytes differ from sent"

    st = _wait_complete(node, CT_STUDY, timeout=20)
    assert st["revision"] == 1
    time.sleep(2.5)  # longer than the quiet window: no second completion
    assert completions(node.storage, CT_STUDY) == [
        (CT_STUDY, 1, "quiet for 2 s", 64)
    ]
    assert study_state(node, CT_STUDY)["revision"] == 1  # type: ignore[index]
    assert node.stop() == 0


def test_chest_ct_project_scu_byte_identical(node_factory: Any) -> None:
    """`dicomnode send` streams the files untouched: stored datasets are the source bytes."""
    files = _chest_ct()
    node = node_factory({"completion": {"quiet_seconds": 1.0}}).start()
    r = run_cli("send", *map(str, files), "--to", f"DICOMNODE@127.0.0.1:{node.port}", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sent 64 of 64" in r.stdout
    for src in files:
        study, series, sop = uids(src)
        out = stored_path(node.storage, study, series, sop)
        assert dataset_bytes(out) == dataset_bytes(src), src.name
        assert str(file_meta(out).TransferSyntaxUID) == IMPLICIT_LE
    _wait_complete(node, CT_STUDY)
    assert len(completions(node.storage, CT_STUDY)) == 1
    assert node.stop() == 0


# -- duplicates and late instances ----------------------------------------------------------


def test_duplicate_series_stored_once_and_late_instance_reopens(node_factory: Any,
                                                                tmp_path: Path) -> None:
    files = make_series(tmp_path / "series", n=12, size=64)
    study, series, _ = uids(files[0])
    node = node_factory({"completion": {"quiet_seconds": 1.5}}).start()
    assert storescu(node.port, files[:10]).returncode == 0
    assert storescu(node.port, files[:10]).returncode == 0  # the same series again
    assert len(stored_files(node.storage)) == 10
    assert index_query(node.storage, "SELECT count(*) FROM instances")[0][0] == 10
    assert study_state(node, study)["instances"] == 10  # type: ignore[index]

    _wait_complete(node, study, 1)
    assert len(completions(node.storage, study)) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in stored_files(node.storage)}

    # sent once more after completion: still nothing new
    assert storescu(node.port, files[:10]).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in stored_files(node.storage)} == mtimes
    assert index_query(node.storage, "SELECT count(*) FROM instances")[0][0] == 10

    # a late instance re-opens the study; it completes again as revision 2
    assert storescu(node.port, files[10:11]).returncode == 0
    st = _wait_complete(node, study, 2)
    assert st["revision"] == 2 and st["instances"] == 11
    time.sleep(2)
    revs = [(c[1], c[3]) for c in completions(node.storage, study)]
    assert revs == [(1, 10), (2, 11)]
    assert node.stop() == 0


# -- other completion rules ---------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_completion_on_association_release(node_factory: Any, tmp_path: Path,
                                           processes: int) -> None:
    files = make_series(tmp_path / "series", n=6, size=64)
    study = uids(files[0])[0]
    node = node_factory(
        {"completion": {"quiet_seconds": 60, "on_association_release": True},
         "ingest": {"processes": processes}}
    ).start()
    assert storescu(node.port, files).returncode == 0
    released = time.monotonic()
    st = _wait_complete(node, study, timeout=10)
    assert time.monotonic() - released < 5
    assert st["instances"] == 6
    assert completions(node.storage, study) == [(study, 1, "association released", 6)]
    assert node.stop() == 0


@pytest.mark.parametrize("processes", [1, 2])
def test_completion_on_expected_count(node_factory: Any, tmp_path: Path, processes: int) -> None:
    files = make_series(tmp_path / "series", n=8, size=64)
    study = uids(files[0])[0]
    node = node_factory({"completion": {"quiet_seconds": 60, "expected_instances": 8},
                         "ingest": {"processes": processes}}).start()
    assert storescu(node.port, files[:5]).returncode == 0
    time.sleep(1.0)
    assert study_state(node, study)["state"] == "receiving"  # type: ignore[index]
    assert storescu(node.port, files[5:]).returncode == 0
    st = _wait_complete(node, study, timeout=10)
    assert st["instances"] == 8
    assert completions(node.storage, study) == [(study, 1, "expected count 8 reached", 8)]
    assert node.stop() == 0


# -- who may associate ------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_allowlist_by_calling_ae(node_factory: Any, tmp_path: Path, processes: int) -> None:
    good = make_series(tmp_path / "good", n=3, size=32)
    bad = make_series(tmp_path / "bad", n=3, size=32)
    node = node_factory({"allowed_callers": [{"ae_title": "GOODSCU"}],
                         "ingest": {"processes": processes}}).start()

    r = storescu(node.port, bad, aet="BADSCU")
    assert r.returncode != 0
    assert "reject" in (r.stderr + r.stdout).lower()
    assert echoscu(node.port, aet="BADSCU").returncode != 0
    assert stored_files(node.storage) == []

    r = storescu(node.port, good, aet="GOODSCU")
    assert r.returncode == 0, r.stderr
    assert len(stored_files(node.storage)) == 3
    assert {uids(p)[2] for p in stored_files(node.storage)} == {uids(p)[2] for p in good}
    assert node.stop() == 0


def test_allowlist_host_restriction(node_factory: Any, tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=2, size=32)
    node = node_factory(
        {"allowed_callers": [{"ae_title": "GOODSCU", "host": "10.0.0.0/8"}]}
    ).start()
    r = storescu(node.port, files, aet="GOODSCU")
    assert r.returncode != 0
    assert echoscu(node.port, aet="GOODSCU").returncode != 0
    assert stored_files(node.storage) == []
    assert node.stop() == 0


def test_wrong_called_ae_title_rejected(node: Any, tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=2, size=32)
    r = storescu(node.port, files, aec="WRONG")
    assert r.returncode != 0
    assert echoscu(node.port, aec="WRONG").returncode != 0
    assert stored_files(node.storage) == []
    assert echoscu(node.port).returncode == 0


# -- the project's own SCU ----------------------------------------------------------------------


def _two_syntax_input(tmp_path: Path) -> list[Path]:
    """4 Explicit VR LE slices and 3 Implicit VR LE slices (another series)."""
    explicit = make_series(tmp_path / "in" / "explicit", n=4, size=32, seed=1)
    implicit = make_series(tmp_path / "in" / "implicit", n=3, size=32, seed=2)
    for p in implicit:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, enforce_file_format=True)
    return explicit + implicit


def test_cli_send_stores_files(node: Any, tmp_path: Path) -> None:
    files = _two_syntax_input(tmp_path)
    r = run_cli("send", str(tmp_path / "in"), "--to", f"DICOMNODE@127.0.0.1:{node.port}", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sent 7 of 7" in r.stdout
    for src in files:
        out = stored_path(node.storage, *uids(src))
        assert out.is_file()
        assert str(file_meta(out).TransferSyntaxUID) == str(file_meta(src).TransferSyntaxUID)
        assert dataset_bytes(out) == dataset_bytes(src)


def test_cli_send_proposes_only_the_files_syntaxes(tmp_path: Path) -> None:
    """A pynetdicom SCP records the presentation contexts `dicomnode send` proposes."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    _two_syntax_input(tmp_path)
    proposed: list[tuple[str, tuple[str, ...]]] = []
    stored: list[str] = []
    lock = threading.Lock()

    def on_requested(event: Any) -> None:
        with lock:
            for cx in event.assoc.requestor.requested_contexts:
                proposed.append((str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax))))

    def on_store(event: Any) -> int:
        with lock:
            stored.append(str(event.context.transfer_syntax))
        return 0x0000

    ae = AE(ae_title="CAPTURE")
    ae.add_supported_context(CTImageStorage, [EXPLICIT_LE, IMPLICIT_LE])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)],
    )
    try:
        r = run_cli("send", str(tmp_path / "in"), "--to", f"CAPTURE@127.0.0.1:{port}", "--quiet")
        assert r.returncode == 0, r.stderr
    finally:
        server.shutdown()
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert sorted(proposed) == sorted([(ct, (EXPLICIT_LE,)), (ct, (IMPLICIT_LE,))])
    assert sorted(stored) == sorted([EXPLICIT_LE] * 4 + [IMPLICIT_LE] * 3)


# -- restart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_restart_within_quiet_window_rearms_completion(node_factory: Any, tmp_path: Path,
                                                       processes: int) -> None:
    files = make_series(tmp_path / "s", n=5, size=32)
    study = uids(files[0])[0]
    node = node_factory({"completion": {"quiet_seconds": 3.0},
                         "ingest": {"processes": processes}}).start()
    assert storescu(node.port, files).returncode == 0
    assert node.stop() == 0  # SIGTERM within the quiet window
    assert study_state(node, study)["state"] == "receiving"  # type: ignore[index]
    assert completions(node.storage, study) == []

    node.start()
    st = _wait_complete(node, study, timeout=20)
    assert st["instances"] == 5
    assert st["completed_at"] >= st["last_received"] + 3.0 - 0.05
    time.sleep(3.5)
    assert [(c[1], c[3]) for c in completions(node.storage, study)] == [(1, 5)]
    assert node.stop() == 0


# -- concurrency ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_series(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """4 series of 30 slices 256x256: series 0+1 in one study, 2+3 in another."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("four-series")
    studies = [generate_uid(prefix="2.25."), generate_uid(prefix="2.25.")]
    return [
        make_series(root / f"s{i}", n=30, size=256, study_uid=studies[i // 2],
                    series_number=i + 1, seed=i)
        for i in range(4)
    ]


@pytest.mark.parametrize("processes", [1, 2])
def test_four_parallel_associations(node_factory: Any, four_series: list[list[Path]],
                                    processes: int) -> None:
    need_tool("storescu")
    node = node_factory({"ingest": {"processes": processes},
                         "completion": {"quiet_seconds": 1.0}}).start()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", f"SCU{i}", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
             *map(str, series)],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, series in enumerate(four_series)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs

    assert len(stored_files(node.storage)) == 120
    by_series = {s["series_uid"]: s["instances"] for st in node.status()["studies"]
                 for s in st["series"]}
    assert sorted(by_series.values()) == [30, 30, 30, 30]
    for series in four_series:
        for src in series:
            out = stored_path(node.storage, *uids(src))
            a, b = pydicom.dcmread(src), pydicom.dcmread(out)
            assert a == b, src
    studies = {uids(s[0])[0] for s in four_series}
    for study in studies:
        _wait_complete(node, study)
        assert [(c[1], c[3]) for c in completions(node.storage, study)] == [(1, 60)]
    assert node.stop() == 0
