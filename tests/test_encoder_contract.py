"""The encoder contract, over every object the node makes (SEG, TID 1500 SR, GSPS,
secondary capture): written through the one result path (encode_objects), read back,
dciodvfy-clean, in the source study, in a series of its own, referencing the source
series' instances, and laid out on the source geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ROOT, need_tool

from dicomnode.core.manifest import load_manifest
from dicomnode.encode.base import KINDS, EncodeInput
from dicomnode.encode.objects import encode_objects
from dicomnode.encode.validate import check_object
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[EncodeInput, dict[str, list[Path]]]:
    need_tool("dciodvfy")
    paths = make_ct_series(tmp_path_factory.mktemp("ct"), 20, 128, 128)
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[4:15, 30:90, 20:50] = 1  # asymmetric, so a flip or transposition shows
    labels[8:18, 40:70, 80:110] = 2
    inp = EncodeInput(
        source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids), labels=labels,
        manifest=load_manifest(ROOT / "models" / "lung_density"),
        measurements={"right lung": {"volume": (12.5, "ml")},
                      "left lung": {"volume": (8.25, "ml")}},
        study_uid=volume.study_uid, series_uid=volume.series_uid)
    return inp, encode_objects(inp, KINDS, tmp_path_factory.mktemp("out"))


def _referenced(ds: pydicom.Dataset) -> set[str]:
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


@pytest.mark.parametrize("kind", KINDS)
def test_written_read_back_and_dciodvfy_clean(made: tuple[EncodeInput, dict[str, list[Path]]],
                                              kind: str) -> None:
    _, objects = made
    assert objects[kind], f"no {kind} written"
    for path in objects[kind]:
        assert path.is_file() and path.stem == pydicom.dcmread(path).SOPInstanceUID
        assert check_object(path) == [], f"{kind} {path.name} is not clean"


@pytest.mark.parametrize("kind", KINDS)
def test_same_study_own_series_references_the_source(
        made: tuple[EncodeInput, dict[str, list[Path]]], kind: str) -> None:
    inp, objects = made
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in inp.source_paths}
    seg_uids = {p.stem for p in objects["seg"]}
    for path in objects[kind]:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == inp.study_uid
        assert ds.SeriesInstanceUID != inp.series_uid
        refs = _referenced(ds) - {ds.SOPInstanceUID}
        if kind == "sr":  # TID 1500 volumetric groups reference the SEG's segments
            assert refs & seg_uids, "the SR does not reference the SEG"
        else:
            assert refs & sources, f"{kind} references no source instance"
        assert refs <= sources | seg_uids, f"{kind} references unknown instances"
        # SeriesInstanceUID in reference sequences; a UIDREF content item (0040,A124) in SR
        series = {str(e.value) for e in ds.iterall() if e.keyword in ("SeriesInstanceUID", "UID")}
        assert inp.series_uid in series, f"{kind} does not name the source series"


def test_objects_lie_on_the_source_geometry(
        made: tuple[EncodeInput, dict[str, list[Path]]]) -> None:
    inp, objects = made
    src = {}
    for p in inp.source_paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        src[ds.SOPInstanceUID] = ds
    first = next(iter(src.values()))
    # SEG: every frame at the position, orientation and spacing of the slice it derives from
    seg = pydicom.dcmread(objects["seg"][0])
    assert seg.SOPClassUID == SEG_CLASS and (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0]
                        .ImageOrientationPatient], [float(v) for v in first.ImageOrientationPatient])
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                       [float(v) for v in first.PixelSpacing])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in src[uid].ImagePositionPatient])
    # SC: one image per source slice, at its slice's position, with its pixel grid
    for path in objects["sc"]:
        sc = pydicom.dcmread(path)
        uid = next(iter(_referenced(sc) & set(src)))
        assert (sc.Rows, sc.Columns) == (src[uid].Rows, src[uid].Columns)
        if "ImagePositionPatient" in sc:
            assert np.allclose([float(v) for v in sc.ImagePositionPatient],
                               [float(v) for v in src[uid].ImagePositionPatient])
    # GSPS: the displayed area is the source image, and contours lie inside it
    for path in objects["gsps"]:
        ps = pydicom.dcmread(path)
        area = ps.DisplayedAreaSelectionSequence[0]
        assert [int(v) for v in area.DisplayedAreaBottomRightHandCorner] == [first.Columns,
                                                                              first.Rows]
        for ann in ps.GraphicAnnotationSequence:
            for obj in ann.get("GraphicObjectSequence", []):
                xy = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
                assert (xy >= 0).all() and (xy[:, 0] <= first.Columns + 1).all() \
                    and (xy[:, 1] <= first.Rows + 1).all()
