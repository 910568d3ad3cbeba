"""De-identified forwarding (dicomnode.export.deidentify), against real DCMTK receivers.

A CT series is loaded with identifying "canary" values in every attribute of PS3.15
Table E.1-1 that it can hold (top level), in sequences (two levels deep, in sequences
the table does not name), and in private attributes; the node's SEG and SR are encoded
from it (and so inherit its patient and study data). Sources and results go through the
outbox to two storescp peers: ``onsite`` (plain) and ``offsite`` (``deidentify: true``).
What ``offsite`` wrote to disk is then checked field by field and byte by byte: no
canary, no original UID, no private attribute; UIDs consistently remapped (the SEG
still references the CT it lies on, as received there); dates shifted by one offset;
the mapping decrypts back to the source study. A Burned In Annotation YES image is
refused for ``offsite`` with the reason in the outbox while ``onsite`` gets it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import ROOT, ReferenceSCP, need_tool
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

from dicomnode.audit.keys import Keyring
from dicomnode.config import Destination, parse_config
from dicomnode.core.manifest import load_manifest
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.objects import encode_objects
from dicomnode.encode.validate import check_object
from dicomnode.errors import ConfigError
from dicomnode.export.deidentify import (
    DESCRIPTORS,
    Deidentifier,
    action_table,
    deidentifying_sender_factory,
    is_clean,
    uids_in,
)
from dicomnode.export.dispatcher import Dispatcher
from dicomnode.export.outbox import DeliveryState, Outbox
from dicomnode.export.pseudonyms import PseudonymStore
from dicomnode.export.senders import make_sender
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

STRING_VRS = {"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def _canary(n: int, vr: str) -> str:
    if vr == "DA":
        return f"1971{n % 12 + 1:02d}{n % 28 + 1:02d}"
    if vr == "TM":
        return f"1011{n % 60:02d}"
    if vr == "DT":
        return f"1971{n % 12 + 1:02d}{n % 28 + 1:02d}1011{n % 60:02d}"
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.999.{n}"
    if vr == "UR":
        return f"http://phi{n:04d}.example"
    return f"PHI{n:04d}"


def _plant(ds: Dataset) -> dict[int, str]:
    """Put a canary into every E.1-1 attribute the data set can take; returns tag -> value."""
    planted: dict[int, str] = {}
    for n, tag in enumerate(sorted(action_table().exact)):
        if tag >> 16 in (0x0000, 0x0002, 0x0004) or tag in ds:  # command, meta, DICOMDIR
            continue
        if keyword_for_tag(tag) in DESCRIPTORS:
            # Clean Descriptors keeps a description that names no one: these hold the
            # patient's name, so they must go
            ds.add_new(tag, dictionary_VR(tag), f"Doe PHI{n:04d}")
            planted[tag] = f"PHI{n:04d}"
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr not in STRING_VRS:
            continue
        value = _canary(n, vr)
        ds.add_new(tag, vr, value)
        planted[tag] = value
    ds.BurnedInAnnotation = "NO"
    # sequences the table does not name, two levels deep, with identifying values inside
    inner = Dataset()
    inner.OperatorsName = "PHIDEEP^OPERATOR"
    inner.PatientID = "PHIDEEPID"
    inner.add_new(0x00990010, "LO", "PHI PRIVATE CREATOR")
    inner.add_new(0x00991001, "LO", "PHIPRIVATEDEEP")
    outer = Dataset()
    outer.PatientName = "PHINESTED^NAME"
    outer.AccessionNumber = "PHINESTACC"
    outer.StudyDate = "19710707"
    outer.ReferencedImageSequence = [inner]
    ds.AnatomicRegionSequence = [outer]
    ds.add_new(0x00190010, "LO", "PHI CREATOR")
    ds.add_new(0x00191001, "LO", "PHIPRIVATETOP")
    ds.add_new(0x00191002, "UN", b"PHIPRIVATEBYTES!")
    return planted


@pytest.fixture
def world(tmp_path: Path) -> Any:
    storage = tmp_path / "storage"
    storage.mkdir()
    keys = Keyring.init(tmp_path / "keys")
    paths = make_ct_series(tmp_path / "ct", n_slices=4, rows=48, cols=48, seed=4)
    originals = []
    for p in paths:  # what a hospital's CT says about its patient
        ds = pydicom.dcmread(p)
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "MRN-123456"
        ds.PatientBirthDate = "19580412"
        ds.AccessionNumber = "ACC-778899"
        ds.StudyID = "ST-4711"
        ds.ReferringPhysicianName = "Strange^Stephen"
        ds.InstitutionName = "Saint Elsewhere Hospital"
        ds.StudyDescription = "CT chest Doe follow-up"
        ds.SeriesDescription = "Lung 1.25 mm"
        ds.save_as(p, enforce_file_format=True)
        originals.append(ds)
    manifest = load_manifest(ROOT / "models" / "lung_density")
    volume = load_series(paths)
    by_uid = {d.SOPInstanceUID: p for d, p in zip(originals, paths, strict=True)}
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[:, 8:20, 6:22] = 1
    labels[:, 8:20, 26:42] = 2
    inp = EncodeInput(source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids),
                      labels=labels, manifest=manifest,
                      measurements={"right lung": {"volume": (1.5, "ml")}},
                      study_uid=volume.study_uid, series_uid=volume.series_uid)
    results = encode_objects(inp, ["seg", "sr", "gsps"], storage / "results")
    planted: dict[int, str] = {}
    for p in paths:  # then every other E.1-1 attribute, sequences and private ones
        ds = pydicom.dcmread(p)
        planted = _plant(ds)
        ds.save_as(p, enforce_file_format=True)
    burned = pydicom.dcmread(paths[0])
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    burned_path = tmp_path / "burned.dcm"
    burned.save_as(burned_path, enforce_file_format=True)
    return {"storage": storage, "keys": keys, "paths": paths, "planted": planted,
            "originals": originals, "results": results, "burned": burned_path,
            "burned_uid": str(burned.SOPInstanceUID), "study": volume.study_uid}


def _secrets(world: dict[str, Any]) -> list[bytes]:
    """Every identifying value that must not reach the off-site peer, as bytes. Times of
    day (TM) are left out: the Modified Dates option shifts dates by whole days and keeps
    times (PS3.15 E.3.6), and a time alone identifies no one."""
    out = {v.encode() for t, v in world["planted"].items() if dictionary_VR(t) != "TM"}
    out |= {b"PHIDEEP", b"PHIDEEPID", b"PHINESTED", b"PHINESTACC", b"19710707", b"PHIPRIVATE",
            b"PHI CREATOR", b"Doe^Jane", b"MRN-123456", b"CT chest Doe", b"19580412",
            b"ACC-778899", b"ST-4711", b"Strange", b"Elsewhere"}
    for ds in world["originals"]:
        out |= {str(u).encode() for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                           ds.SOPInstanceUID, ds.FrameOfReferenceUID)}
    for paths in world["results"].values():
        out |= {p.stem.encode() for p in paths}
    return sorted(out)


def test_offsite_destination_receives_nothing_identifying(world: dict[str, Any],
                                                          tmp_path: Path) -> None:
    onsite_scp = ReferenceSCP(tmp_path / "onsite")
    offsite_scp = ReferenceSCP(tmp_path / "offsite")
    storage: Path = world["storage"]
    outbox = Outbox(storage)
    offsite = Destination(name="offsite", ae_title="REFSCP", host="127.0.0.1",
                          port=offsite_scp.port, deidentify=True,
                          deidentify_options={"retain_longitudinal_modified_dates": True,
                                              "clean_descriptors": True})
    onsite = Destination(name="onsite", ae_title="REFSCP", host="127.0.0.1", port=onsite_scp.port)
    factory = deidentifying_sender_factory(storage, world["keys"])
    disp = Dispatcher(outbox, [onsite, offsite], "DICOMNODE", sender_factory=factory)
    files = [*world["paths"], *(p for v in world["results"].values() for p in v), world["burned"]]
    try:
        for name in ("onsite", "offsite"):
            outbox.enqueue(name, files, key=f"{world['study']}/1/r/s/lung_density")
            disp.drain(name)
        # the burned-in image: refused off-site with its reason, delivered on-site
        (refused,) = outbox.select(sop_instance_uids=[world["burned_uid"]], destination="offsite")
        assert refused.state is DeliveryState.FAILED
        assert "Burned In Annotation is YES" in (refused.last_error or "")
        (plain,) = outbox.select(sop_instance_uids=[world["burned_uid"]], destination="onsite")
        assert plain.state is DeliveryState.SENT
        others = [d for d in outbox.select() if d.sop_instance_uid != world["burned_uid"]]
        assert {d.state for d in others} == {DeliveryState.SENT}
    finally:
        disp.stop()
        outbox.close()
        onsite_scp.stop()
        offsite_scp.stop()

    received = sorted(p for p in offsite_scp.outdir.iterdir() if p.is_file())
    assert len(received) == len(files) - 1
    assert len([p for p in onsite_scp.outdir.iterdir() if p.is_file()]) == len(files)
    secrets = _secrets(world)
    table = action_table()
    datasets = []
    for path in received:
        raw = path.read_bytes()
        leaked = [s for s in secrets if s in raw]
        assert not leaked, f"{path.name} carries identifying values {leaked[:5]}"
        ds = pydicom.dcmread(path)
        datasets.append(ds)
        for elem in ds.iterall():
            assert not elem.tag.is_private, f"{path.name}: private {elem.tag} left"
            planted = world["planted"].get(int(elem.tag))
            if planted is not None and elem.value not in (None, "") and elem.VR != "TM":
                assert planted not in str(elem.value), f"{path.name}: {elem.keyword} kept"
            if table.action(int(elem.tag)) == "X" and elem.VR not in ("DA", "DT", "TM") \
                    and elem.keyword not in ("StudyDescription", "SeriesDescription"):
                # (dates are shifted, not removed, with Modified Dates; descriptions are
                # kept when clean, with Clean Descriptors)
                pytest.fail(f"{path.name}: {elem.keyword} must have been removed")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert {i.CodeValue for i in ds.DeidentificationMethodCodeSequence} == {
            "113100", "113107", "113105"}
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # one pseudonymous patient and study; the references still hold
    assert len({d.PatientID for d in datasets}) == 1 and datasets[0].PatientID.startswith("DN-")
    assert {str(d.PatientName) for d in datasets} == {datasets[0].PatientID}
    assert len({d.StudyInstanceUID for d in datasets}) == 1
    cts = {d.SOPInstanceUID for d in datasets if d.Modality == "CT"}
    (seg,) = [d for d in datasets if d.Modality == "SEG"]
    (sr,) = [d for d in datasets if d.Modality == "SR"]
    sources = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
               for f in seg.PerFrameFunctionalGroupsSequence}
    assert sources == cts
    assert {d.FrameOfReferenceUID for d in datasets if "FrameOfReferenceUID" in d} == {
        seg.FrameOfReferenceUID}
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    # the SEG, and the CT slices its planar regions are drawn on (for OHIF)
    assert seg.SOPInstanceUID in evidence and evidence - {seg.SOPInstanceUID} <= cts
    # dates: one offset for the patient, kept clean descriptions, dropped identifying ones
    ct = next(d for d in datasets if d.Modality == "CT")
    shift = (pydicom.valuerep.DA(world["originals"][0].StudyDate)
             - pydicom.valuerep.DA(ct.StudyDate)).days
    assert 365 <= shift <= 4015 and all(
        (pydicom.valuerep.DA(world["originals"][0].StudyDate)
         - pydicom.valuerep.DA(d.StudyDate)).days == shift for d in datasets)
    assert ct.SeriesDescription == "Lung 1.25 mm" and "StudyDescription" not in ct
    # results stay valid objects after de-identification, and model identity stays
    for ds in (seg, sr):
        assert check_object(ds) == [], ds.Modality
        assert ds.ManufacturerModelName == "lung_density"
    # the mapping decrypts back to the source study and patient
    store = PseudonymStore(storage, world["keys"])
    assert store.original("offsite", "uid", ct.StudyInstanceUID) == world["study"]
    assert store.original("offsite", "patient", ct.PatientID) == "MRN-123456"
    raw_db = store.path.read_bytes()
    assert world["study"].encode() not in raw_db and b"MRN-123456" not in raw_db
    # consistent across restarts: a new de-identifier gives the same pseudonyms
    again = Deidentifier(offsite, store).deidentify(pydicom.dcmread(world["paths"][0]))
    assert again.StudyInstanceUID == ct.StudyInstanceUID and again.PatientID == ct.PatientID
    store.close()


def test_basic_profile_without_options_removes_dates_and_descriptions(world: dict[str, Any]) -> None:
    store = PseudonymStore(world["storage"], world["keys"])
    dest = Destination(name="research", ae_title="R", host="127.0.0.1", port=104, deidentify=True)
    ds = Deidentifier(dest, store).deidentify(pydicom.dcmread(world["paths"][0]))
    assert "SeriesDescription" not in ds and "StudyDescription" not in ds
    assert ds.get("StudyDate") in (None, "") and ds.get("PatientBirthDate") in (None, "")
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]
    other = Destination(name="other", ae_title="R", host="127.0.0.1", port=104, deidentify=True)
    ds2 = Deidentifier(other, store).deidentify(pydicom.dcmread(world["paths"][0]))
    assert ds2.StudyInstanceUID != ds.StudyInstanceUID  # unrelated per destination
    assert not set(uids_in(ds2)) & {world["study"]}
    store.close()


def test_images_that_may_carry_burned_in_text_are_refused(world: dict[str, Any]) -> None:
    store = PseudonymStore(world["storage"], world["keys"])
    dest = Destination(name="research", ae_title="R", host="127.0.0.1", port=104, deidentify=True)
    deid = Deidentifier(dest, store)
    us = pydicom.dcmread(world["paths"][0])
    us.Modality = "US"
    del us.BurnedInAnnotation
    assert "does not say Burned In Annotation NO" in (deid.refusal(us) or "")
    us.BurnedInAnnotation = "NO"
    assert deid.refusal(us) is None
    allowed = Destination(name="research", ae_title="R", host="127.0.0.1", port=104,
                          deidentify=True, deidentify_options={"allow_burned_in": True})
    yes = pydicom.dcmread(world["burned"])
    assert Deidentifier(allowed, store).refusal(yes) is None
    assert "YES" in (deid.refusal(yes) or "")
    store.close()


def test_clean_text_test() -> None:
    tokens = {"doe", "jane", "mrn-123456", "general", "hospital"}
    assert is_clean("Lung 1.25 mm", tokens)
    assert not is_clean("CT chest Doe follow-up", tokens)
    assert not is_clean("scan of 2021-03-04", tokens) and not is_clean("ref 1234567", tokens)


def test_configuration_names_the_bad_field(tmp_path: Path) -> None:
    base = {"name": "research", "ae_title": "R", "host": "127.0.0.1", "port": 104,
            "deidentify": True}
    with pytest.raises(ConfigError) as info:
        parse_config({"destinations": [{**base, "deidentify_profile": "strict"}]})
    assert "destinations.0.deidentify_profile" in str(info.value)
    assert "unknown de-identification profile 'strict'" in str(info.value)
    with pytest.raises(ConfigError, match="allow_burned_in"):
        parse_config({"destinations": [{**base, "objects": ["seg", "sc"]}]})
    parse_config({"destinations": [{**base, "objects": ["seg", "sc"],
                                    "deidentify_options": {"allow_burned_in": True}}]})
    config = tmp_path / "node.yaml"
    config.write_text("destinations:\n  - {name: r, ae_title: R, host: 127.0.0.1, port: 104,"
                      " deidentify: true, deidentify_profile: nope}\n")
    out = subprocess.run([sys.executable, "-m", "dicomnode", "config", "check", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "destinations.0.deidentify_profile" in out.stderr
    # a de-identified destination never gets a plain sender
    with pytest.raises(ValueError, match="deidentifying_sender_factory"):
        make_sender(Destination(**base), "DICOMNODE")


def test_table_is_the_standard_one() -> None:
    table = action_table()
    assert table.version == "dicomfields_2026c" and len(table.exact) > 600
    assert table.action(0x00100010) == "Z" and table.action(0x0020000D) == "U"
    assert table.action(0x60003000) == "X" and table.action(0x60023000) == "X"  # overlays
    need_tool("dciodvfy")
    assert re.match(r"^[A-Z]+$", table.action(0x00081030) or "")
