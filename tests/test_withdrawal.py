"""Withdrawing replaced results (IHE IOCM): the rejection note, the flow, the command.

* ``dicomnode.encode.kos``: a rejection note over real SEG, SR, GSPS and SC results is
  written, read back (pydicom + highdicom) and passes dciodvfy; references, title,
  model identity and deterministic UIDs are checked field by field.
* ``dicomnode.withdrawal``: results of revision 1 go to a real DCMTK storescp and to a
  destination that is down; revision 2 replaces them; the rejection note waits in the
  gate until revision 2 is delivered, then reaches storescp and references exactly
  what storescp received; unsent deliveries are dropped; doing it again changes
  nothing; QIDO's query leaves the withdrawn results out.
* ``dicomnode results withdraw``: unknown study / never sent / already withdrawn say
  so and change nothing; a withdrawal by hand is audited.
* Orthanc, with the real chest CT (last slice held back, then sent): Orthanc ends up
  holding the new SEG and SR and the rejection note. Orthanc (1.10 here; up to 1.12
  too, per its book and changelog) does not implement IHE IOCM: it stores the note as
  an ordinary KO instance in its own series and keeps offering the old SEG and SR.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import ROOT, ReferenceSCP, dicom_files, free_port, need_tool, run_cli, shared
from orthanc import OrthancServer, orthanc_binary

from dicomnode.config import Destination
from dicomnode.core.index import Index, InstanceRecord
from dicomnode.core.manifest import Manifest, load_manifest
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.kos import (
    KEY_OBJECT_SELECTION_STORAGE,
    PATIENT_SAFETY,
    QUALITY,
    ModelIdentity,
    RejectedInstance,
    encode_rejection_note,
    read_rejection_note,
)
from dicomnode.encode.objects import encode_objects
from dicomnode.encode.validate import EncodingError, check_object
from dicomnode.export.dispatcher import Dispatcher
from dicomnode.export.outbox import DeliveryState, Outbox
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series
from dicomnode.withdrawal import RejectionGate, WithdrawalError, note_key, withdraw

MODEL_DIR = ROOT / "models" / "lung_density"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODEL_DIR)


def _input(paths: list[Path], manifest: Manifest, revision: int,
           replaces: dict[str, tuple[str, ...]] | None = None) -> EncodeInput:
    """EncodeInput in the volume's order, with lung-like labels (air inside the body:
    left/right half), as the worker builds it; no model needed."""
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    hu = np.asarray(volume.array)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    air = hu < -400
    half = hu.shape[2] // 2
    labels[:, :, :half][air[:, :, :half]] = 1
    labels[:, :, half:][air[:, :, half:]] = 2
    labels[:, :4] = 0  # not the very top rows (outside air)
    names = [lab.name for lab in manifest.labels]
    return EncodeInput(
        source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids), labels=labels,
        manifest=manifest, measurements={n: {"volume": (float(i + 1), "ml")}
                                         for i, n in enumerate(names)},
        study_uid=volume.study_uid, series_uid=volume.series_uid, revision=revision,
        replaces=replaces or {})


def _index_results(index: Index, storage: Path, paths: list[Path]) -> None:
    """As the worker does: results are indexed with origin 'result'."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        index.add_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="DICOMNODE",
            size=path.stat().st_size, received_at=time.time(),
            path=str(path.relative_to(storage)), called_ae="DICOMNODE", origin="result"))


def _index_sources(index: Index, storage: Path, paths: list[Path]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        index.add_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="MODALITY",
            size=path.stat().st_size, received_at=time.time(), path=str(path)))


def _uids(objects: dict[str, list[Path]]) -> set[str]:
    return {p.stem for paths in objects.values() for p in paths}


def _dimse(name: str, port: int, aet: str) -> Destination:
    return Destination(name=name, ae_title=aet, host="127.0.0.1", port=port,
                       objects=("seg", "sr"))


# -- the rejection note ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_kinds(tmp_path_factory: pytest.TempPathFactory, manifest: Manifest) -> dict[str, Any]:
    """Real SEG, SR, GSPS and SC results on a small synthetic series."""
    folder = tmp_path_factory.mktemp("kos-src")
    paths = make_ct_series(folder / "ct", n_slices=6, rows=64, cols=64, seed=5)
    inp = _input(paths, manifest, 1)
    objects = encode_objects(inp, ["seg", "sr", "gsps", "sc"], folder / "out")
    return {"inp": inp, "objects": objects, "paths": paths}


def test_rejection_note_passes_dciodvfy_reads_back_and_references_every_result(
        four_kinds: dict[str, Any], tmp_path: Path) -> None:
    objects = four_kinds["objects"]
    files = [p for kind in ("seg", "sr", "gsps", "sc") for p in objects[kind]]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    rejected = [RejectedInstance.from_dataset(h) for h in headers]
    note = encode_rejection_note(rejected, headers[0], destination="pacs",
                                 identity=ModelIdentity("lung_density", "1.0.0"),
                                 description="replaced by revision 2")
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    assert check_object(path) == []  # read back (highdicom for KO) + dciodvfy, no error
    need_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    assert not [x for x in lines if x.startswith(("Error", "Warning"))], lines

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == KEY_OBJECT_SELECTION_STORAGE and ds.Modality == "KO"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert "CodingSchemeVersion" not in title  # some archives then miss the note
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    # evidence: one study, one item per result series, each instance by class and UID
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == four_kinds["inp"].study_uid
    evidence = {(s.SeriesInstanceUID, r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
                for s in study.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {(h.SeriesInstanceUID, h.SOPClassUID, h.SOPInstanceUID) for h in headers}
    # content tree: IMAGE for SEG and SC, COMPOSITE for SR and GSPS
    kinds = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
             for item in ds.ContentSequence if "ReferencedSOPSequence" in item}
    for h in headers:
        image = h.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7")
        assert kinds[h.SOPInstanceUID] == ("IMAGE" if image else "COMPOSITE")
    # patient and study copied from the results; model identity
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert ds[keyword].value == headers[0][keyword].value
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.ManufacturerModelName == "lung_density"
    assert "lung_density 1.0.0" in list(ds.SoftwareVersions)
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in ds.ContentSequence}
    assert observer["Device Observer Name"].TextValue == "lung_density 1.0.0"

    back = read_rejection_note(path)
    assert back.title == QUALITY and back.description == "replaced by revision 2"
    assert set(back.rejected) == set(rejected)


def test_rejection_note_uids_are_deterministic(four_kinds: dict[str, Any]) -> None:
    seg = pydicom.dcmread(four_kinds["objects"]["seg"][0], stop_before_pixels=True)
    sr = pydicom.dcmread(four_kinds["objects"]["sr"][0], stop_before_pixels=True)
    refs = [RejectedInstance.from_dataset(seg), RejectedInstance.from_dataset(sr)]
    a = encode_rejection_note(refs, seg, destination="pacs")
    b = encode_rejection_note(list(reversed(refs)), sr, destination="pacs")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    others = [encode_rejection_note(refs, seg, destination="viewer"),
              encode_rejection_note(refs[:1], seg, destination="pacs"),
              encode_rejection_note(refs, seg, destination="pacs", title=PATIENT_SAFETY)]
    assert len({a.SOPInstanceUID, *(o.SOPInstanceUID for o in others)}) == 4


def test_rejection_note_refuses_bad_input(four_kinds: dict[str, Any]) -> None:
    seg = pydicom.dcmread(four_kinds["objects"]["seg"][0], stop_before_pixels=True)
    ref = RejectedInstance.from_dataset(seg)
    with pytest.raises(EncodingError, match="at least one"):
        encode_rejection_note([], seg, destination="pacs")
    other = RejectedInstance("1.2.3", "1.2.3.4", ref.sop_class_uid, "1.2.3.4.5")
    with pytest.raises(EncodingError, match="2 studies"):
        encode_rejection_note([ref, other], seg, destination="pacs")
    from pydicom.sr.coding import Code
    with pytest.raises(EncodingError, match="CID 7011"):
        encode_rejection_note([ref], seg, destination="pacs", title=Code("1", "99X", "x"))
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        RejectedInstance("1.2", "1.2", "1.2", "01.2")


# -- the flow, against a real storescp ------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, manifest: Manifest) -> Iterator[dict[str, Any]]:
    storage = tmp_path / "storage"
    storage.mkdir()
    ct = make_ct_series(tmp_path / "ct", n_slices=5, rows=64, cols=64, seed=9)
    index = Index(Index.path_for(storage))
    outbox = Outbox(storage, backoff_base=60, backoff_max=60)
    gate = RejectionGate(storage)
    scp = ReferenceSCP(tmp_path / "scp")
    dests = [_dimse("pacs", scp.port, "REFSCP"), _dimse("down", free_port(), "NOBODY")]
    disp = Dispatcher(outbox, dests, "DICOMNODE",
                      after_batch=lambda d: gate.release(outbox, d))
    try:
        yield {"storage": storage, "ct": ct, "index": index, "outbox": outbox, "gate": gate,
               "scp": scp, "disp": disp, "manifest": manifest}
    finally:
        scp.stop()
        gate.close()
        outbox.close()
        index.close()


def _deliver(site: dict[str, Any], revision: int, replaces: dict[str, tuple[str, ...]] | None,
             ct: list[Path]) -> dict[str, list[Path]]:
    storage: Path = site["storage"]
    inp = _input(ct, site["manifest"], revision, replaces)
    objects = encode_objects(inp, ["seg", "sr"], storage / "results" / f"r{revision}")
    files = [p for paths in objects.values() for p in paths]
    _index_results(site["index"], storage, files)
    key = f"{inp.study_uid}/{revision}/rule/{inp.series_uid}/lung_density"
    for dest in ("pacs", "down"):
        site["outbox"].enqueue(dest, files, key=key)
    return objects


def test_revision_withdraws_what_each_destination_received_after_the_new_results(
        site: dict[str, Any]) -> None:
    outbox: Outbox = site["outbox"]
    disp: Dispatcher = site["disp"]
    ct = site["ct"]
    _index_sources(site["index"], site["storage"], ct)
    old = _deliver(site, 1, None, ct[:-1])
    disp.drain("pacs")
    disp.run_once("down")  # tried once, peer down: may or may not hold them
    old_uids = _uids(old)
    assert all(site["scp"].find(u) for u in old_uids)
    assert {d.state for d in outbox.select(sop_instance_uids=old_uids, destination="down")} == {
        DeliveryState.PENDING}

    new = _deliver(site, 2, {k: tuple(p.stem for p in v) for k, v in old.items()}, ct)
    new_uids = _uids(new)
    study = pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    report = withdraw(storage=site["storage"], outbox=outbox, index=site["index"],
                      gate=site["gate"], study_uid=study, reason="replaced by revision 2",
                      replaced=old_uids, after={"pacs": new_uids, "down": new_uids},
                      identity=ModelIdentity("lung_density", "1.0.0"))
    assert set(report.withdrawn) == old_uids
    by_dest = {d.destination: d for d in report.destinations}
    assert {r.sop_instance_uid for r in by_dest["pacs"].rejected} == old_uids
    # "down" was tried once for each old object: they are referenced, and dropped
    assert {r.sop_instance_uid for r in by_dest["down"].rejected} == old_uids
    assert by_dest["down"].dropped == len(old_uids)
    assert not outbox.select(sop_instance_uids=old_uids, destination="down")
    # the notes wait for the new results: nothing of them in the outbox yet
    assert not outbox.select(key_prefix=note_key(study))
    assert len(site["gate"].held()) == 2

    disp.drain("pacs")  # the new results, then (released after that batch) the note
    disp.drain("pacs")
    assert all(site["scp"].find(u) for u in new_uids)
    note_path = site["scp"].find(by_dest["pacs"].note_uid)
    assert note_path is not None, "the rejection note did not reach storescp"
    note = read_rejection_note(note_path)
    assert {r.sop_instance_uid for r in note.rejected} == old_uids
    assert note.title == QUALITY and note.description == "replaced by revision 2"
    assert [n for n in site["gate"].held() if n[0] == "pacs"] == []
    # "down" still waits: its new results are not delivered
    assert [n[0] for n in site["gate"].held()] == ["down"]

    # again (a crash and a re-run): nothing new
    again = withdraw(storage=site["storage"], outbox=outbox, index=site["index"],
                     gate=site["gate"], study_uid=study, reason="replaced by revision 2",
                     replaced=old_uids, after={"pacs": new_uids, "down": new_uids},
                     identity=ModelIdentity("lung_density", "1.0.0"))
    assert again.withdrawn == () and again.notes == []
    assert len(outbox.select(key_prefix=note_key(study), destination="pacs")) == 1

    # QIDO's view: the withdrawn results are gone, the new ones and the sources stay
    offered = {r.sop_instance_uid for r in site["index"].instances(study_uid=study, offered=True)}
    assert not offered & old_uids
    assert new_uids <= offered and len(offered) == len(new_uids) + len(ct)
    assert site["index"].withdrawn(study) == old_uids
    rows = site["index"].query("SELECT count(*) AS n FROM instances WHERE sop_instance_uid"
                               " NOT IN (SELECT sop_instance_uid FROM withdrawn_results)")
    assert rows[0]["n"] == len(offered)


def test_withdraw_by_hand_refuses_bad_input_and_changes_nothing(site: dict[str, Any]) -> None:
    outbox: Outbox = site["outbox"]
    ct = site["ct"]
    study = pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    common = {"storage": site["storage"], "outbox": outbox, "index": site["index"],
              "gate": site["gate"], "reason": "wrong series"}
    with pytest.raises(WithdrawalError, match="unknown study"):
        withdraw(study_uid="1.2.3.999", **common)
    _index_sources(site["index"], site["storage"], ct)
    with pytest.raises(WithdrawalError, match="never sent"):
        withdraw(study_uid=study, **common)
    objects = _deliver(site, 1, None, ct)  # queued, never tried
    before = [(d.id, d.state) for d in outbox.select()]
    with pytest.raises(WithdrawalError, match="never sent"):
        withdraw(study_uid=study, **common)
    assert [(d.id, d.state) for d in outbox.select()] == before
    assert site["index"].withdrawn() == set()
    with pytest.raises(WithdrawalError, match="reason is required"):
        withdraw(study_uid=study, **{**common, "reason": " "})

    site["disp"].drain("pacs")
    report = withdraw(study_uid=study, model="lung_density", **common)
    assert {d.destination for d in report.destinations if d.note_uid} == {"pacs"}
    assert set(report.withdrawn) == _uids(objects)
    # the never-tried deliveries to "down" are dropped, "pacs" gets its note at once
    assert not outbox.select(destination="down")
    assert len(outbox.select(key_prefix=note_key(study), destination="pacs")) == 1
    with pytest.raises(WithdrawalError, match="already withdrawn"):
        withdraw(study_uid=study, **common)


# -- the command ------------------------------------------------------------------------------


def test_results_withdraw_command(tmp_path: Path, manifest: Manifest) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"storage": str(storage), "destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]}))
    args = ["--config", str(config)]
    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32, seed=2)
    study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    index = Index(Index.path_for(storage))
    _index_sources(index, storage, ct)
    out = run_cli("results", "withdraw", "1.2.3.4", "--reason", "test", *args)
    assert out.returncode == 1 and "unknown study" in out.stderr and "nothing changed" in out.stderr
    out = run_cli("results", "withdraw", study, "--reason", "test", *args)
    assert out.returncode == 1 and "never sent" in out.stderr
    assert not (storage / "outbox").exists() and not (storage / "withdrawals").exists()

    inp = _input(ct, manifest, 1)
    objects = encode_objects(inp, ["seg", "sr"], storage / "results" / "r1")
    files = [p for v in objects.values() for p in v]
    _index_results(index, storage, files)
    index.close()
    with Outbox(storage) as box:
        ids = [d.id for d in box.enqueue("pacs", files, key=f"{study}/1/r/{inp.series_uid}/lung_density")]
        box.mark_sent(ids)
    out = run_cli("results", "withdraw", study, "--model", "other", "--reason", "x", *args)
    assert out.returncode == 1 and "never sent" in out.stderr
    out = run_cli("results", "withdraw", study, "--reason", "segmented the wrong series", *args)
    assert out.returncode == 0, out.stderr
    assert "pacs: rejection note" in out.stdout and "2 result(s)" in out.stdout
    with Outbox(storage) as box:
        (note,) = box.select(key_prefix=note_key(study))
        assert note.state is DeliveryState.PENDING
        assert read_rejection_note(note.path).description == "segmented the wrong series"
    out = run_cli("results", "withdraw", study, "--reason", "again", *args)
    assert out.returncode == 1 and "already withdrawn" in out.stderr
    # audited in the cli chain, decryptable by audit export
    out = run_cli("audit", "export", *args)
    assert out.returncode == 0, out.stderr
    records = [r["event"] for r in json.loads(out.stdout)]
    withdrawn = [r for r in records if "RESULTS_WITHDRAWN" in json.dumps(r)]
    assert len(withdrawn) == 1 and "segmented the wrong series" in json.dumps(withdrawn[0])
    assert study in json.dumps(withdrawn[0])


# -- Orthanc, real chest CT ---------------------------------------------------------------------


def test_orthanc_holds_new_results_and_the_rejection_note(tmp_path: Path, manifest: Manifest) -> None:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    ct = dicom_files(shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB"))
    volume = load_series(ct)
    last = set(volume.sop_instance_uids[-1:])
    first = [p for p in ct if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID not in last]
    storage = tmp_path / "storage"
    storage.mkdir()
    with OrthancServer(tmp_path / "orthanc", dicomweb=False) as pacs:
        index = Index(Index.path_for(storage))
        outbox = Outbox(storage)
        gate = RejectionGate(storage)
        dest = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1",
                           port=pacs.dicom_port)
        disp = Dispatcher(outbox, [dest], "DICOMNODE", after_batch=lambda d: gate.release(outbox, d))
        try:
            site = {"storage": storage, "index": index, "outbox": outbox, "manifest": manifest}
            _index_sources(index, storage, ct)
            old = _deliver_to(site, 1, None, first, ["pacs"])
            disp.drain("pacs")
            new = _deliver_to(site, 2, {k: tuple(p.stem for p in v) for k, v in old.items()},
                              ct, ["pacs"])
            withdraw(storage=storage, outbox=outbox, index=index, gate=gate,
                     study_uid=volume.study_uid, reason="replaced: a late slice arrived",
                     replaced=_uids(old), after={"pacs": _uids(new)},
                     identity=ModelIdentity(manifest.name, manifest.version))
            disp.drain("pacs")
            disp.drain("pacs")
        finally:
            gate.close()
            outbox.close()
            index.close()
        # the PACS holds the new SEG and SR and a rejection note referencing the old ones
        for uid in _uids(new):
            assert pacs.has(uid), f"new result {uid} not in Orthanc"
        notes = pacs.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "KO"}})
        assert len(notes) == 1
        note = read_rejection_note(pydicom.dcmread(io.BytesIO(pacs.file(notes[0]))))
        assert {r.sop_instance_uid for r in note.rejected} == _uids(old)
        # what Orthanc does with them: nothing (no IOCM) - the old results stay offered
        for uid in _uids(old):
            assert pacs.has(uid), "Orthanc removed or hid a rejected instance"
        series = pacs.get(f"/instances/{notes[0]}/series")
        assert series["MainDicomTags"]["Modality"] == "KO"


def _deliver_to(site: dict[str, Any], revision: int, replaces: dict[str, tuple[str, ...]] | None,
                ct: list[Path], dests: list[str]) -> dict[str, list[Path]]:
    storage: Path = site["storage"]
    inp = _input(ct, site["manifest"], revision, replaces)
    objects = encode_objects(inp, ["seg", "sr"], storage / "results" / f"r{revision}")
    files = [p for paths in objects.values() for p in paths]
    _index_results(site["index"], storage, files)
    for dest in dests:
        site["outbox"].enqueue(dest, files,
                               key=f"{inp.study_uid}/{revision}/rule/{inp.series_uid}/lung_density")
    return objects


def test_withdrawal_audit_event_round_trips_and_writes_xml() -> None:
    from dicomnode.audit import events
    from dicomnode.audit.withdrawal import ET_RESULTS_WITHDRAWN, results_withdrawn

    event = results_withdrawn("1.2.3", {KEY_OBJECT_SELECTION_STORAGE: 1,
                                        "1.2.840.10008.5.1.4.1.1.66.4": 2},
                              ["pacs", "viewer"], "wrong series", user="alice")
    assert events.from_dict(events.to_dict(event)) == event
    assert event.event.action == "U" and event.event.type_codes == (ET_RESULTS_WITHDRAWN,)
    assert event.participants[0].user_id == "alice" and event.participants[0].is_requestor
    (study,) = event.objects
    assert study.life_cycle == 14 and ("Destination", "viewer") in study.details
    xml = events.to_xml(event)
    assert "RESULTS_WITHDRAWN" in xml and "wrong series" in xml
    with pytest.raises(ValueError, match="reason"):
        results_withdrawn("1.2.3", {}, [], " ")
