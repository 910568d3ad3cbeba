"""The TID 1500 SR as OHIF 3.13 reads it (tests/ohif_sr.py, a port of its SR handler):
every finding is drawn on a referenced image with its measurements, nothing makes
OHIF throw, and the outlines are the labels' own.

Same inputs as test_encode_seg_sr.py (synthetic blobs; the real chest CT with the lung
model's prediction). The browser test (test_browser_ohif.py) checks it in OHIF itself.
"""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ohif_sr import OhifStops, image_library, measurements, rehydratable, shown_on
from test_encode_seg_sr import _input_from_series, manifest, real, synthetic  # noqa: F401

from dicomnode.encode.seg import encode_seg, tracking_uid
from dicomnode.encode.sr import encode_sr
from dicomnode.encode.sr_regions import (
    MIN_POINTS,
    densify,
    outline,
    representative_slice,
    total_slice,
)
from dicomnode.encode.validate import check_object
from dicomnode.synthetic import make_ct_series


@pytest.fixture(params=["synthetic", "real"])
def case(request):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


def _uids(inp) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in inp.source_paths]


def _inside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the closed polygon (even-odd rule)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    x, y = xx + 0.5, yy + 0.5
    inside = np.zeros(shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if y0 == y1:
            continue
        crosses = (y0 <= y) != (y1 <= y)
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def test_ohif_shows_every_finding_with_its_measurements(case) -> None:  # type: ignore[no-untyped-def]
    inp, sr = case["inp"], hd.sr.srread(case["sr_path"])
    uids = _uids(inp)
    shown = shown_on(sr, set(uids))
    labels = inp.manifest.labels
    names = [lab.name for lab in labels] + (["total"] if "total" in inp.measurements else [])
    assert [m.tracking_identifier.split(" (")[0] for m in shown] == names
    for m, label in zip(shown, labels, strict=False):
        assert m.geometric and m.tracking_uid == tracking_uid(inp, label)
        mask = inp.labels == label.value
        k = representative_slice(mask)
        assert m.coords[0].referenced_sop == uids[k]
        assert np.count_nonzero(mask[k]) == max(np.count_nonzero(s) for s in mask)
        lines = m.text_lines()
        volume = inp.measurements[label.name]["volume"][0]
        assert lines[0] == f"Volume: {volume:.2f} ml"
        assert any(line.startswith("Area: ") and line.endswith(" mm2") for line in lines)
        assert any(line.startswith("Attenuation Coefficient: ") for line in lines)
        # the outline is the label's largest region on that slice
        poly = np.array(pydicom_outline(sr, m.tracking_uid))
        inner = _inside(poly, mask.shape[1:])
        from scipy import ndimage

        regions, n = ndimage.label(mask[k])
        largest = regions == 1 + int(np.argmax(ndimage.sum(mask[k], regions, range(1, n + 1))))
        assert (largest & inner).sum() >= 0.97 * largest.sum()
        assert (inner & ~mask[k]).sum() <= 0.08 * inner.sum() + 4  # holes, simplification
    if "total" in inp.measurements:
        total = shown[-1]
        assert not total.geometric and total.text_lines()[0].startswith("Volume: ")
        own = {representative_slice(inp.labels == lab.value) for lab in labels}
        k = total_slice(inp.labels, [lab.value for lab in labels], avoid=own)
        assert {c.referenced_sop for c in total.coords} == {uids[k]}
        assert k not in own  # both blobs/lungs show on other slices too
        assert all((inp.labels[k] == lab.value).any() for lab in labels)
        counts = [(inp.labels[j] > 0).sum() for j in range(len(uids))
                  if j not in own and all((inp.labels[j] == lab.value).any() for lab in labels)]
        assert (inp.labels[k] > 0).sum() == max(counts)


def pydicom_outline(sr, tracking: str) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """The Image Region of the planar group with this Tracking UID."""
    for group in sr.ContentSequence[-1].ContentSequence:
        items = list(group.ContentSequence)
        if any(i.ValueType == "UIDREF" and i.UID == tracking for i in items):
            for i in items:
                if i.ValueType == "SCOORD":
                    d = [float(v) for v in i.GraphicData]
                    return list(zip(d[0::2], d[1::2], strict=True))
    raise AssertionError(f"no planar group for {tracking}")


def test_sr_structure_library_evidence_and_no_hydration(case) -> None:  # type: ignore[no-untyped-def]
    inp, seg, sr = case["inp"], case["seg"], hd.sr.srread(case["sr_path"])
    uids = _uids(inp)
    report = hd.sr.MeasurementReport.from_sequence([sr], copy=True)
    planar = report.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in planar] == [lab.name for lab in inp.manifest.labels]
    for g, label in zip(planar, inp.manifest.labels, strict=True):
        region = g.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        data = region.value
        assert len(data) >= MIN_POINTS and np.array_equal(data[0], data[-1])
        (area,) = g.get_measurements()
        assert area.name.value == "42798000" and area.unit.value == "mm2" and area.value > 0
        assert g.tracking_uid == seg.SegmentSequence[label.value - 1].TrackingUID
    own = {representative_slice(inp.labels == lab.value) for lab in inp.manifest.labels}
    k = total_slice(inp.labels, [lab.value for lab in inp.manifest.labels], avoid=own)
    drawn = sorted({uids[j] for j in own | {k}}, key=uids.index)
    assert image_library(sr) == drawn
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    series = {s.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence}
              for s in study.ReferencedSeriesSequence}
    assert series[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    assert series[inp.series_uid] == set(drawn)
    # no outline looks like a rectangle tool to OHIF (4 or 5 points): read-only display
    assert rehydratable(sr) == []


def test_the_sr_without_planar_groups_stops_ohif(synthetic) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The report as it was before (volumetric groups only) is what crashed OHIF."""
    sr = copy.deepcopy(synthetic["sr"])
    container = sr.ContentSequence[-1]
    container.ContentSequence = [g for g in container.ContentSequence
                                 if not any(i.ValueType == "SCOORD" for i in g.ContentSequence)]
    for g in container.ContentSequence:
        for i in g.ContentSequence:
            if i.ValueType == "NUM" and "ContentSequence" in i:
                i.ContentSequence = [c for c in i.ContentSequence if c.ValueType != "SCOORD"]
    assert len(measurements(sr)) == 3
    with pytest.raises(OhifStops, match="ReferencedSOPSequence"):
        shown_on(sr, set(_uids(synthetic["inp"])))


def test_a_missing_structure_gets_no_group_and_ohif_still_shows_the_rest(synthetic) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    inp = synthetic["inp"]
    labels = np.where(inp.labels == 2, 0, inp.labels).astype(np.uint8)
    measures = {"right lung": inp.measurements["right lung"],
                "total": {"volume": inp.measurements["right lung"]["volume"]}}
    one = dataclasses.replace(inp, labels=labels, measurements=measures)
    sr = encode_sr(one, encode_seg(one))
    assert check_object(sr) == []
    shown = shown_on(sr, set(_uids(one)))
    assert [m.tracking_identifier.split(" (")[0] for m in shown] == ["right lung", "total"]


def test_nothing_found_still_encodes_but_ohif_cannot_show_it(synthetic) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A known limit: with no voxel and no measurement at all there is nothing to draw,
    and OHIF 3.13 cannot show a finding without an image coordinate."""
    inp = dataclasses.replace(synthetic["inp"], labels=np.zeros_like(synthetic["inp"].labels),
                              measurements={})
    sr = encode_sr(inp, encode_seg(inp))
    assert check_object(sr) == []
    assert image_library(sr) == []
    with pytest.raises(OhifStops):
        shown_on(sr, set(_uids(inp)))


def test_tiny_regions_get_an_outline_ohif_does_not_take_for_a_rectangle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    square = densify(np.array([[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]], dtype=float))
    assert len(square) >= MIN_POINTS and np.array_equal(square[0], square[-1])
    mask = np.zeros((8, 8), dtype=bool)
    mask[3:5, 3:5] = True
    found = outline(mask, 0, (0.5, 0.7))
    assert found is not None and len(found.points) >= MIN_POINTS
    assert found.area_mm2 == pytest.approx(4 * 0.5 * 0.7)
    assert outline(np.zeros((8, 8), dtype=bool), 0, (1.0, 1.0)) is None
    # a label that is one small square on a few slices: still drawn, not rehydratable
    paths = make_ct_series(tmp_path / "ct", n_slices=6, rows=32, cols=32, seed=1)

    def labels(volume):  # type: ignore[no-untyped-def]
        lab = np.zeros(volume.shape, dtype=np.uint8)
        lab[2:4, 10:12, 10:12] = 1
        lab[1:5, 15:25, 18:28] = 2
        return lab

    from test_encode_seg_sr import MODEL_DIR

    from dicomnode.core.manifest import load_manifest

    inp, _ = _input_from_series(paths, labels, load_manifest(MODEL_DIR))
    sr = encode_sr(inp, encode_seg(inp))
    assert check_object(sr) == []
    assert len(shown_on(sr, set(_uids(inp)))) == 2
    assert rehydratable(sr) == []

