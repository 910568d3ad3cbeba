"""DICOM-SEG and TID 1500 SR encoders (``dicomnode.encode.seg`` / ``.sr``) and their validator.

Inputs: (a) a synthetic CT series (40 slices 128x128) with two asymmetric blobs as
labels 1 and 2 of the lung manifest and empty slices at both ends; (b) the real
chest CT (TCIA Lung-PET-CT-Dx, shared data) with the lung model's own prediction.

Every object is written, read back (pydicom + highdicom) and checked with dciodvfy;
each SEG frame is traced back, through its Derivation Image Sequence, to the source
instance whose labels it holds, pixel by pixel.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import ROOT, dicom_files, need_tool, shared

from dicomnode.core.manifest import Code, Label, Manifest, load_manifest
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.seg import SEGMENTATION_STORAGE, encode_seg
from dicomnode.encode.sr import encode_sr
from dicomnode.encode.validate import EncodingError, check_object, ensure_valid
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

MODEL_DIR = ROOT / "models" / "lung_density"
HU = "[hnsf'U]"


# -- inputs ------------------------------------------------------------------------------


def _input_from_series(paths: list[Path], labels_fn, manifest: Manifest, measurements=None,
                       **kw) -> tuple[EncodeInput, object]:
    """EncodeInput in the volume's slice order, as the worker builds it."""
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    labels = labels_fn(volume)
    inp = EncodeInput(
        source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids),
        labels=labels,
        manifest=manifest,
        measurements=measurements(volume, labels) if callable(measurements) else (measurements or {}),
        study_uid=volume.study_uid,
        series_uid=volume.series_uid,
        **kw,
    )
    return inp, volume


def _blobs(volume) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Two asymmetric blobs (an L and a wedge), so that a flip or shift would show."""
    n, rows, cols = volume.shape
    lab = np.zeros((n, rows, cols), dtype=np.uint8)
    i, j = np.mgrid[0:rows, 0:cols]
    ell = ((i >= 30) & (i < 90) & (j >= 20) & (j < 35)) | ((i >= 75) & (i < 90) & (j >= 20) & (j < 55))
    wedge = (j >= 70) & (j < 110) & (i >= 40) & (i - 40 < (j - 70) * 1.2)
    lab[5:22][:, ell] = 1
    lab[12:31][:, wedge] = 2
    lab[12:22][:, 35:38, 40:45] = 2  # a bit of label 2 next to label 1 on shared slices
    return lab


def _measures(volume, labels) -> dict[str, dict[str, tuple[float, str]]]:  # type: ignore[no-untyped-def]
    out = {}
    for name, value in (("right lung", 1), ("left lung", 2)):
        mask = labels == value
        hu = volume.array[mask]
        out[name] = {
            "volume": (float(mask.sum() * volume.voxel_volume_ml), "ml"),
            "mean density": (float(hu.mean()), HU),
            "LAA%-950": (float(100.0 * (hu < -950).mean()), "%"),
            "PD15": (float(np.percentile(hu, 15)), HU),
        }
    out["total"] = {"volume": (out["right lung"]["volume"][0] + out["left lung"]["volume"][0], "ml")}
    return out


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODEL_DIR)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, manifest):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("synthetic-ct")
    paths = make_ct_series(folder, n_slices=40, rows=128, cols=128, seed=3)
    inp, volume = _input_from_series(paths, _blobs, manifest, _measures)
    seg = encode_seg(inp)
    sr = encode_sr(inp, seg)
    out = tmp_path_factory.mktemp("synthetic-results")
    seg_path, sr_path = out / "seg.dcm", out / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return {"inp": inp, "volume": volume, "seg": seg, "sr": sr, "seg_path": seg_path, "sr_path": sr_path}


@pytest.fixture(scope="module")
def real(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The real chest CT with the lung model's prediction (the model runs on the CPU, ~1 s)."""
    from dicomnode.inference.runtimes import load_model

    folder = shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
    paths = dicom_files(folder)
    model = load_model(MODEL_DIR, "cpu")
    prediction = {}

    def labels(volume):  # type: ignore[no-untyped-def]
        prediction["p"] = model.predict(volume)
        return prediction["p"].labels

    inp, volume = _input_from_series(paths, labels, model.manifest,
                                     lambda v, lab: prediction["p"].measurements)
    seg = encode_seg(inp)
    sr = encode_sr(inp, seg)
    out = tmp_path_factory.mktemp("real-results")
    seg.save_as(out / "seg.dcm", enforce_file_format=True)
    sr.save_as(out / "sr.dcm", enforce_file_format=True)
    return {"inp": inp, "volume": volume, "seg": seg, "sr": sr,
            "seg_path": out / "seg.dcm", "sr_path": out / "sr.dcm"}


@pytest.fixture(params=["synthetic", "real"])
def case(request):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


# -- helpers -----------------------------------------------------------------------------


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    exe = need_tool("dciodvfy")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def _frame_map(seg_path: Path, inp: EncodeInput):  # type: ignore[no-untyped-def]
    """(segment number, source slice k, frame pixels, frame position) of every frame."""
    ds = pydicom.dcmread(seg_path)
    k_of = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k
            for k, p in enumerate(inp.source_paths)}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = []
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sources = item.DerivationImageSequence[0].SourceImageSequence
        assert len(sources) == 1
        uid = str(sources[0].ReferencedSOPInstanceUID)
        position = [float(x) for x in item.PlanePositionSequence[0].ImagePositionPatient]
        out.append((seg_number, k_of[uid], pixels[f], position))
    return ds, out


# -- SEG ---------------------------------------------------------------------------------


def test_seg_and_sr_pass_dciodvfy_and_read_back(case):  # type: ignore[no-untyped-def]
    _, source_warnings = _dciodvfy(case["inp"].source_paths[0])
    for key in ("seg_path", "sr_path"):
        errors, warnings = _dciodvfy(case[key])
        assert errors == [], f"{key}: {errors}"
        # the only warnings: our private coding scheme designator is not a defined term,
        # and what the source already had (copied patient/study attributes)
        ours = [w for w in warnings if "99DICOMNODE" not in w and w not in source_warnings]
        assert ours == [], f"{key}: {ours}"
    assert check_object(case["seg"]) == []
    assert check_object(case["sr_path"]) == []
    ensure_valid(case["sr"])
    seg = hd.seg.segread(case["seg_path"])
    assert seg.number_of_segments == len(case["inp"].manifest.labels)
    assert isinstance(hd.sr.srread(case["sr_path"]), hd.sr.Comprehensive3DSR)


def test_seg_frames_map_to_source_instances_pixel_by_pixel(case):  # type: ignore[no-untyped-def]
    inp, volume = case["inp"], case["volume"]
    ds, frames = _frame_map(case["seg_path"], inp)
    values = [lab.value for lab in inp.manifest.labels]
    # empty frames are kept: one frame per segment and source instance, each exactly once
    assert len(frames) == len(values) * len(inp.source_paths)
    assert sorted((s, k) for s, k, _, _ in frames) == [
        (s, k) for s in range(1, len(values) + 1) for k in range(len(inp.source_paths))]
    for seg_number, k, pixels, position in frames:
        expected = inp.labels[k] == values[seg_number - 1]
        assert np.array_equal(pixels.astype(bool), expected), (seg_number, k)
        source = pydicom.dcmread(inp.source_paths[k], stop_before_pixels=True)
        assert np.allclose(position, [float(x) for x in source.ImagePositionPatient], atol=1e-4)
        assert np.allclose(position, volume.index_to_patient(np.array([[k, 0, 0]]))[0], atol=1e-3)
    # frames are ordered by segment, then by position along the slice normal
    for s in range(1, len(values) + 1):
        ks = [k for seg_number, k, _, _ in frames if seg_number == s]
        assert ks in (sorted(ks), sorted(ks, reverse=True))
    # highdicom, reading it back, gives the same label map per source instance
    seg = hd.seg.segread(case["seg_path"])
    uids = [str(u) for u in volume.sop_instance_uids]
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    expected = np.zeros_like(inp.labels)
    for number, value in enumerate(values, start=1):
        expected[inp.labels == value] = number
    assert np.array_equal(got, expected)


def test_seg_references_source_series_and_geometry(case):  # type: ignore[no-untyped-def]
    inp = case["inp"]
    ds = pydicom.dcmread(case["seg_path"], stop_before_pixels=True)
    first = pydicom.dcmread(inp.source_paths[0], stop_before_pixels=True)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == inp.study_uid
    assert ds.SeriesInstanceUID == inp.uid("seg", "series") != inp.series_uid
    assert ds.SOPInstanceUID == inp.uid("seg", "instance")
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == inp.series_uid
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in inp.source_paths}
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == source_uids
    shared_fg = ds.SharedFunctionalGroupsSequence[0]
    assert [float(x) for x in shared_fg.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        pytest.approx([float(x) for x in first.ImageOrientationPatient])
    assert [float(x) for x in shared_fg.PixelMeasuresSequence[0].PixelSpacing] == \
        pytest.approx([float(x) for x in first.PixelSpacing])
    pointers = [int(i.DimensionIndexPointer) for i in ds.DimensionIndexSequence]
    assert pointers == [0x0062000B, 0x00200032]  # segment number, then Image Position (Patient)
    assert ds.SeriesNumber == 10000 + int(first.SeriesNumber) % 10000


def test_seg_segments_and_model_identity(synthetic):  # type: ignore[no-untyped-def]
    inp, ds = synthetic["inp"], pydicom.dcmread(synthetic["seg_path"], stop_before_pixels=True)
    manifest = inp.manifest
    for item, label in zip(ds.SegmentSequence, manifest.labels, strict=True):
        assert item.SegmentLabel == label.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == label.category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == label.type.scheme
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (manifest.name, manifest.version)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(rgb, label.color, atol=2)
        assert item.TrackingID == label.name
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "dicomnode"]
    assert len(ours) == 1
    assert ours[0].ManufacturerModelName == manifest.name
    assert f"{manifest.name} {manifest.version}" in list(ours[0].SoftwareVersions)
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ds.Manufacturer == "dicomnode" and ds.ManufacturerModelName == manifest.name
    assert manifest.name in ds.SeriesDescription and manifest.version in ds.SeriesDescription


def test_empty_labels_still_encode(synthetic, tmp_path):  # type: ignore[no-untyped-def]
    inp = dataclasses.replace(synthetic["inp"], labels=np.zeros_like(synthetic["inp"].labels),
                              measurements={})
    seg = encode_seg(inp)
    assert int(seg.NumberOfFrames) == 2 * len(inp.source_paths)
    assert check_object(seg) == []
    assert check_object(encode_sr(inp, seg)) == []


def test_label_values_need_not_be_segment_numbers(synthetic):  # type: ignore[no-untyped-def]
    base = synthetic["inp"]
    sct = dict(scheme="SCT")
    manifest = Manifest(
        name="two_things", version="0.1", runtime="builtin",
        labels=(
            Label(value=7, name="liver", category=Code(value="91723000", meaning="Anatomical Structure", **sct),
                  type=Code(value="10200004", meaning="Liver", **sct)),
            Label(value=3, name="spleen", category=Code(value="91723000", meaning="Anatomical Structure", **sct),
                  type=Code(value="78961009", meaning="Spleen", **sct),
                  anatomic_region=Code(value="818981001", meaning="Abdomen", **sct)),
        ),
    )
    labels = np.where(base.labels == 1, 7, np.where(base.labels == 2, 3, 0)).astype(np.uint8)
    inp = dataclasses.replace(base, labels=labels, manifest=manifest, measurements={})
    seg = encode_seg(inp)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), -1)
    k_of = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(inp.source_paths)}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = k_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.array_equal(pixels[f].astype(bool), (labels[k] == (7, 3)[number - 1]).ravel())
    assert seg.SegmentSequence[1].AnatomicRegionSequence[0].CodeValue == "818981001"
    assert check_object(seg) == []


@pytest.mark.parametrize("change, message", [
    (lambda lab: np.where(lab == 2, 9, lab).astype(np.uint8), "values [9]"),
    (lambda lab: lab[:-1], "39 slices for 40"),
    (lambda lab: lab[:, :-1], "slices of"),
    (lambda lab: lab.astype(np.float32), "dtype float32"),
])
def test_bad_labels_are_refused(synthetic, change, message):  # type: ignore[no-untyped-def]
    inp = dataclasses.replace(synthetic["inp"], labels=change(synthetic["inp"].labels))
    with pytest.raises(EncodingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        encode_seg(inp)


# -- UIDs and revisions ------------------------------------------------------------------


def test_uids_are_deterministic_and_revisions_replace(synthetic):  # type: ignore[no-untyped-def]
    inp, seg1, sr1 = synthetic["inp"], synthetic["seg"], synthetic["sr"]
    seg_again = encode_seg(inp)
    sr_again = encode_sr(inp, seg_again)
    for a, b in ((seg1, seg_again), (sr1, sr_again)):
        assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == \
            (b.StudyInstanceUID, b.SeriesInstanceUID, b.SOPInstanceUID)
    assert [s.TrackingUID for s in seg1.SegmentSequence] == [s.TrackingUID for s in seg_again.SegmentSequence]
    assert "PredecessorDocumentsSequence" not in sr1 and "ReferencedInstanceSequence" not in seg1

    rev2 = dataclasses.replace(inp, revision=2, replaces={"seg": (seg1.SOPInstanceUID,),
                                                          "sr": (sr1.SOPInstanceUID,)})
    seg2 = encode_seg(rev2)
    sr2 = encode_sr(rev2, seg2)
    assert seg2.SOPInstanceUID not in (seg1.SOPInstanceUID, sr1.SOPInstanceUID)
    assert seg2.SeriesInstanceUID != seg1.SeriesInstanceUID
    assert sr2.SOPInstanceUID != sr1.SOPInstanceUID and sr2.SeriesInstanceUID != sr1.SeriesInstanceUID
    assert seg2.StudyInstanceUID == sr2.StudyInstanceUID == inp.study_uid
    # the SEG names the one it replaces (General Reference Module) ...
    (ref,) = seg2.ReferencedInstanceSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SEGMENTATION_STORAGE, seg1.SOPInstanceUID)
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "REPLACED"
    assert seg2.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DICOMNODE"
    # ... and the SR its predecessor (PS3.3 C.17.2.3), with that SR's own series
    (study,) = sr2.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert study.StudyInstanceUID == inp.study_uid and series.SeriesInstanceUID == sr1.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr1.SOPInstanceUID
    # tracking UIDs stay: the same lung in both revisions
    assert [s.TrackingUID for s in seg2.SegmentSequence] == [s.TrackingUID for s in seg1.SegmentSequence]
    # the revision-2 SR refers to the revision-2 SEG
    report = hd.sr.MeasurementReport.from_sequence([sr2], copy=True)
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment.referenced_sop_instance_uid == seg2.SOPInstanceUID
    for obj in (seg2, sr2):
        assert check_object(obj) == []
    # an SR UID that is no earlier revision's cannot be placed in a series: refused
    bad = dataclasses.replace(rev2, replaces={"sr": ("2.25.1",)})
    with pytest.raises(EncodingError, match="2.25.1"):
        encode_sr(bad, seg2)


# -- SR ----------------------------------------------------------------------------------


def test_sr_measurements_units_and_segment_references(case):  # type: ignore[no-untyped-def]
    inp, seg = case["inp"], case["seg"]
    sr = hd.sr.srread(case["sr_path"])
    assert sr.StudyInstanceUID == inp.study_uid
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (inp.uid("sr", "series"), inp.uid("sr", "instance"))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        seg.SOPInstanceUID
    report = hd.sr.MeasurementReport.from_sequence([sr], copy=True)
    groups = report.get_volumetric_roi_measurement_groups()
    labels = inp.manifest.labels
    assert [g.tracking_identifier for g in groups] == [lab.name for lab in labels]
    for number, (group, label) in enumerate(zip(groups, labels, strict=True), start=1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == SEGMENTATION_STORAGE
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == inp.series_uid
        assert group.finding_type.value == label.type.value
        assert group.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
        _check_measurements(group.get_measurements(), inp.measurements.get(label.name, {}))
    if "total" in inp.measurements:
        (total,) = report.get_image_measurement_groups()
        assert total.tracking_identifier.startswith("total")
        _check_measurements(total.get_measurements(), inp.measurements["total"])


def _check_measurements(got, expected) -> None:  # type: ignore[no-untyped-def]
    names = {
        "volume": ("118565006", "SCT"),
        "mean density": ("112031", "DCM"),
        "LAA%-950": ("LAA950", "99DICOMNODE"),
        "PD15": ("PD15", "99DICOMNODE"),
    }
    assert len(got) == len(expected)
    for m, (quantity, (value, unit)) in zip(got, expected.items(), strict=True):
        assert (m.name.value, m.name.scheme_designator) == names[quantity]
        assert m.value == pytest.approx(value, rel=1e-9, abs=1e-9)
        assert (m.unit.value, m.unit.scheme_designator) == (unit, "UCUM")
        if quantity == "mean density":
            assert m.derivation.value == "373098007"  # SCT Mean


def test_sr_observer_procedure_and_model_identity(case):  # type: ignore[no-untyped-def]
    manifest = case["inp"].manifest
    sr = hd.sr.srread(case["sr_path"])
    report = hd.sr.MeasurementReport.from_sequence([sr], copy=True)
    (device,) = report.get_observer_contexts(observer_type=pydicom.sr.codedict.codes.DCM.Device)
    attrs = device.observer_identifying_attributes
    assert attrs.name == f"{manifest.name} {manifest.version}"
    assert attrs.model_name == manifest.name and attrs.manufacturer_name == "dicomnode"
    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "24627-2"  # CT Chest
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "dicomnode"]
    assert ours and ours[0].ManufacturerModelName == manifest.name
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DICOMNODE"
    for group in report.get_volumetric_roi_measurement_groups():
        algo = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
                for i in group[0].ContentSequence if i.ValueType == "TEXT"}
        assert algo["Algorithm Name"] == manifest.name
        assert algo["Algorithm Version"] == manifest.version


def test_sr_refuses_unknown_measurement_groups(synthetic):  # type: ignore[no-untyped-def]
    inp = dataclasses.replace(synthetic["inp"], measurements={"spleen": {"volume": (1.0, "ml")}})
    with pytest.raises(EncodingError, match="spleen"):
        encode_sr(inp, synthetic["seg"])


# -- validator ---------------------------------------------------------------------------


def test_ensure_valid_raises_on_a_broken_object(synthetic):  # type: ignore[no-untyped-def]
    need_tool("dciodvfy")
    broken = pydicom.dcmread(synthetic["sr_path"])
    del broken.ContentSequence[0].ConceptNameCodeSequence  # not a valid SR content item any more
    del broken.Modality
    problems = check_object(broken)
    assert problems and any(p.startswith("dciodvfy: Error") for p in problems), problems
    with pytest.raises(EncodingError) as err:
        ensure_valid(broken)
    assert err.value.problems == problems


def test_encode_does_not_import_torch() -> None:
    code = ("import sys, dicomnode.encode.seg, dicomnode.encode.sr, dicomnode.encode.validate, "
            "dicomnode.encode.equipment; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
