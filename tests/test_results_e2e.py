"""The whole way round, with a real PACS: Orthanc sends the chest CT to the node; the
node returns SEG and SR (and, for a destination that asks for them, the GSPS and
secondary-capture fallbacks) into the same study in Orthanc."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import ROOT, dicom_files, shared
from orthanc import OrthancServer, orthanc_binary

ARTIFACTS = ROOT / "test-artifacts"


def _settings(orthanc: OrthancServer) -> dict[str, Any]:
    pacs = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
    return {
        "models_dir": str(ROOT / "models"),
        "completion": {"quiet_seconds": 1.0},
        "destinations": [
            {"name": "pacs", **pacs, "objects": ["seg", "sr"]},
            {"name": "pacs-legacy-viewer", **pacs, "objects": ["gsps", "sc"]},
        ],
        "export": {"retry_base_seconds": 0.5, "retry_max_seconds": 2},
        "routing": [{
            "name": "chest-ct-lung-density",
            "model": "lung_density",
            "destinations": ["pacs", "pacs-legacy-viewer"],
            "match": {"modality": ["CT"], "body_part": "chest|lung|thorax",
                      "orientation": "axial"},
        }],
    }


def _series_by_modality(orthanc: OrthancServer, study_id: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        out.setdefault(series["MainDicomTags"]["Modality"], []).extend(series["Instances"])
    return out


def _dataset(orthanc: OrthancServer, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc.file(instance_id)))


@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    server = OrthancServer(tmp_path / "orthanc", dicomweb=False)
    try:
        yield server.start()
    finally:
        server.stop()


def test_orthanc_sends_the_chest_ct_and_gets_seg_sr_and_fallbacks(node_factory: Any,
                                                                  pacs: OrthancServer) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory(_settings(pacs)).start(timeout=120)
    pacs.add_modality("NODE", "DICOMNODE", "127.0.0.1", node.port)
    uploaded = [pacs.upload(p) for p in chest]
    study_id = uploaded[0]["ParentStudy"]
    pacs.send_to_modality("NODE", [u["ID"] for u in uploaded])  # the PACS's auto-routing

    def delivered() -> dict[str, Any] | None:
        out = json.loads(subprocess.run(
            [sys.executable, "-m", "dicomnode", "outbox", "--json", "--all", "--config",
             str(node.config_path)], capture_output=True, text=True, check=True).stdout)
        counts = out["summary"]
        done = counts and all(c["sent"] > 0 and c["pending"] == 0 and c["failed"] == 0
                              for c in counts.values())
        return out if done and len(counts) == 2 else None

    outbox = node.wait_for(delivered, timeout=300, interval=1.0)
    series = _series_by_modality(pacs, study_id)
    assert len(series["CT"]) == 64
    assert len(series["SEG"]) == 1 and len(series["SR"]) == 1 and len(series["PR"]) == 1

    job = node.status()["jobs"][0]
    assert job["state"] == "done"
    result = job["result"]
    labels = np.load(node.storage / result["labels_path"])["labels"]
    source_uids: list[str] = result["sop_instance_uids"]

    # SEG: same study, new series, references the source; frames map back exactly
    seg_ds = _dataset(pacs, series["SEG"][0])
    source_study = pydicom.dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID
    assert seg_ds.StudyInstanceUID == source_study
    assert seg_ds.SeriesInstanceUID != result["series_uid"]
    referenced = {i.ReferencedSOPInstanceUID
                  for s in seg_ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == set(source_uids)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    numbers = {d.SegmentLabel: int(d.SegmentNumber) for d in seg_ds.SegmentSequence}
    manifest_values = {"right lung": 1, "left lung": 2}
    for name, value in manifest_values.items():
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids, segment_numbers=[numbers[name]],
        )[..., 0]
        assert np.array_equal(pixels.astype(bool), labels == value), name
    models = [str(e.get("ManufacturerModelName", "")) for e in seg_ds.ContributingEquipmentSequence]
    assert any(m.startswith("lung_density") for m in models), models

    # SR: TID 1500, references the SEG, carries the measurements with units
    sr_ds = _dataset(pacs, series["SR"][0])
    assert sr_ds.StudyInstanceUID == source_study
    sr_text = str(sr_ds)
    assert seg_ds.SOPInstanceUID in sr_text
    assert "ml" in sr_text and "LAA950" in sr_text

    # fallbacks for the destination that asked for them
    pr = _dataset(pacs, series["PR"][0])
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert len(series["OT"]) >= 1
    sc = _dataset(pacs, series["OT"][0])
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in str(sc.get("ImageComments", "")).upper() + str(
        sc.get("SeriesDescription", "")).upper()

    # exactly once: every delivered object is in Orthanc, once
    sent = [d for d in outbox["deliveries"] if d["state"] == "sent"]
    assert len({d["sop_instance_uid"] for d in sent}) == len(sent) == 3 + len(series["OT"])
    assert pacs.count_instances() == 64 + len(sent)

    # IT's view: the turnaround (last instance -> results delivered) per model
    import urllib.request

    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).read().decode()
    count = [line for line in metrics.splitlines()
             if line.startswith('dicomnode_turnaround_seconds_count{model="lung_density"}')]
    assert count and float(count[0].split()[-1]) >= 1, count

    _write_overlay_png(pacs, series["CT"], seg, source_uids, numbers)


def _write_overlay_png(pacs: OrthancServer, ct_ids: list[str], seg: Any,
                       source_uids: list[str], numbers: dict[str, int]) -> None:
    """One slice with the SEG overlay, rendered from what Orthanc holds (to look at)."""
    from PIL import Image

    k = len(source_uids) // 2
    by_uid = {}
    for oid in ct_ids:
        ds = _dataset(pacs, oid)
        by_uid[ds.SOPInstanceUID] = ds
    ct = by_uid[source_uids[k]]
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    gray = np.clip((hu + 1350) / 1500, 0, 1) * 255  # lung window
    rgb = np.stack([gray] * 3, axis=-1)
    colours = {numbers["right lung"]: (0, 200, 0), numbers["left lung"]: (255, 190, 0)}
    for number, colour in colours.items():
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source_uids[k]], segment_numbers=[number])[0, ..., 0] > 0
        rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array(colour)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(ARTIFACTS / "e2e_orthanc_seg_overlay.png")


def test_late_slice_makes_a_revision_whose_rejection_note_reaches_the_pacs(
        node_factory: Any, pacs: OrthancServer) -> None:
    """IHE IOCM through the whole node: the chest CT without its last slice is complete
    and gets SEG + SR; the late slice re-opens the study, revision 2 gets new SEG + SR, and
    the PACS then receives a rejection note (KOS, "Rejected for Quality Reasons")
    referencing exactly the replaced revision-1 objects, after the new ones."""
    from dicomnode.encode.kos import read_rejection_note
    from dicomnode.inference.volume import load_series

    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    last = load_series(chest).sop_instance_uids[-1]
    late = [p for p in chest if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == last]
    first = [p for p in chest if p not in late]
    settings = _settings(pacs)
    settings["destinations"] = settings["destinations"][:1]
    settings["routing"][0]["destinations"] = ["pacs"]
    node = node_factory(settings).start(timeout=120)
    from conftest import storescu

    def results_in_pacs(n: int) -> dict[str, list[str]] | None:
        studies = pacs.get("/studies")
        if not studies:
            return None
        series = _series_by_modality(pacs, studies[0])
        got = len(series.get("SEG", [])) + len(series.get("SR", []))
        return series if got >= n else None

    assert storescu(node.port, first).returncode == 0
    assert storescu(pacs.dicom_port, first, aec=pacs.ae_title).returncode == 0
    before = node.wait_for(lambda: results_in_pacs(2), timeout=300, interval=1.0)
    old = {_dataset(pacs, i).SOPInstanceUID for i in before["SEG"] + before["SR"]}

    assert storescu(node.port, late).returncode == 0  # the late slice: revision 2
    after = node.wait_for(lambda: (s := results_in_pacs(4)) and "KO" in s and s,
                          timeout=300, interval=1.0)
    new = {_dataset(pacs, i).SOPInstanceUID for i in after["SEG"] + after["SR"]} - old
    assert len(new) == 2 and not new & old
    (note_id,) = after["KO"]
    note = read_rejection_note(_dataset(pacs, note_id))
    assert {r.sop_instance_uid for r in note.rejected} == old
    assert note.title.value == "113001"
    # the node stops offering the withdrawn results over QIDO-RS
    import urllib.request

    study_uid = _dataset(pacs, note_id).StudyInstanceUID
    offered = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{node.http_port}/dicom-web/studies/{study_uid}/instances",
        timeout=10).read())
    offered_uids = {i["00080018"]["Value"][0] for i in offered}
    assert not offered_uids & old and new <= offered_uids
