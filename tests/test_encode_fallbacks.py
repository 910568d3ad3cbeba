"""Viewer fallbacks: GSPS contours (encode/gsps.py) and burned-in secondary capture (encode/sc.py).

Every object is written, read back and checked with dciodvfy (and with
``dicomnode.encode.validate.check_object`` where that exists).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import ROOT, dicom_files, need_tool, shared
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.core.manifest import load_manifest
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.gsps import (
    LUNG_WINDOW,
    contour_area,
    encode_gsps,
    label_contours,
    trace_contours,
)
from dicomnode.encode.sc import ALPHA, WARNING_COLOR, choose_window, encode_sc, render_frame
from dicomnode.synthetic import make_ct_series

MODEL_DIR = ROOT / "models" / "lung_density"
ARTIFACTS = ROOT / "test-artifacts"
N, SIZE = 20, 128
LABELLED_1 = range(5, 15)  # slices with label 1
LABELLED_2 = range(8, 12)  # slices with label 2
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


# -- helpers ----------------------------------------------------------------------------


def validate(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds``, read it back, and fail on any dciodvfy error (or check_object problem)."""
    dciodvfy = need_tool("dciodvfy")
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy on {path.name}:\n" + "\n".join(errors)
    try:
        validate_mod = importlib.import_module("dicomnode.encode.validate")
    except ImportError:
        validate_mod = None
    if validate_mod is not None and hasattr(validate_mod, "check_object"):
        problems = validate_mod.check_object(back)
        assert not problems, problems
    return back


def sorted_series(paths: list[Path]) -> tuple[Path, ...]:
    """The slice order of the volume: along the slice normal (axial here: by z)."""
    return tuple(sorted(paths, key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])))


def make_input(paths: tuple[Path, ...], labels: np.ndarray, **kw: object) -> EncodeInput:
    h = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return EncodeInput(source_paths=paths, labels=labels, manifest=load_manifest(MODEL_DIR),
                       measurements={}, study_uid=str(h.StudyInstanceUID),
                       series_uid=str(h.SeriesInstanceUID), **kw)  # type: ignore[arg-type]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def boundary_corners(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the pixel corners where foreground and background meet (PIXEL units)."""
    p = np.pad(mask, 1).astype(int)
    # corner (x, y) touches pixels rows y-1..y, columns x-1..x (p is offset by 1)
    s = p[:-1, :-1] + p[:-1, 1:] + p[1:, :-1] + p[1:, 1:]
    ys, xs = np.nonzero((s > 0) & (s < 4))
    return np.stack([xs, ys], axis=1).astype(float)


def rasterize(polylines: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres (j + 0.5, i + 0.5) lie inside the closed polylines (even-odd)."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    px, py = xs + 0.5, ys + 0.5
    inside = np.zeros(shape, dtype=bool)
    for pts in polylines:
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
            if y0 == y1:
                continue
            crosses = (py >= min(y0, y1)) & (py < max(y0, y1))
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (px < x_at)
    return inside


def graphic_objects(ps: Dataset, sop: str) -> dict[str, list[np.ndarray]]:
    """Polylines per graphic layer on the image ``sop``."""
    out: dict[str, list[np.ndarray]] = {}
    for ann in ps.GraphicAnnotationSequence:
        if ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID != sop:
            continue
        for obj in ann.get("GraphicObjectSequence", []):
            out.setdefault(ann.GraphicLayer, []).append(
                np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2))
    return out


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    folder = tmp_path_factory.mktemp("fallback_ct")
    return sorted_series(make_ct_series(folder, n_slices=N, rows=SIZE, cols=SIZE, seed=3))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Two blobs: a disc (label 1) on slices 5..14, an ellipse with a hole (2) on 8..11."""
    lab = np.zeros((N, SIZE, SIZE), dtype=np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for k in LABELLED_1:
        lab[k][(yy - 64) ** 2 + (xx - 40) ** 2 < 14**2] = 1
    for k in LABELLED_2:
        blob = ((yy - 62) / 20.0) ** 2 + ((xx - 92) / 10.0) ** 2 < 1
        hole = (yy - 62) ** 2 + (xx - 92) ** 2 < 3**2
        lab[k][blob & ~hole] = 2
    return lab


@pytest.fixture(scope="module")
def inp(series: tuple[Path, ...], labels: np.ndarray) -> EncodeInput:
    return make_input(series, labels)


@pytest.fixture(scope="module")
def gsps(inp: EncodeInput) -> Dataset:
    out = encode_gsps(inp)
    assert len(out) == 1
    return out[0]


@pytest.fixture(scope="module")
def scs(inp: EncodeInput) -> list[Dataset]:
    return encode_sc(inp)


# -- contour tracing --------------------------------------------------------------------


def test_single_pixel_contour_is_that_pixels_square() -> None:
    """PS3.3 C.10.5.1.2: PIXEL (0,0) is the top left corner of the top left pixel, so
    pixel (row 40, column 70) is the square [70, 71] x [40, 41], centre (70.5, 40.5)."""
    mask = np.zeros((64, 96), dtype=bool)
    mask[40, 70] = True
    (contour,) = label_contours(mask)
    assert np.array_equal(contour[0], contour[-1]), "closed: first point repeated"
    assert {tuple(p) for p in contour[:-1]} == {(70, 40), (71, 40), (71, 41), (70, 41)}
    assert len(contour) == 5
    assert np.array_equal(rasterize([contour], mask.shape), mask)


def test_trace_contours_holes_and_corner_touching_pixels() -> None:
    ring = np.zeros((9, 9), dtype=bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    contours = trace_contours(ring)
    assert sorted(contour_area(c) for c in contours) == [-1.0, 25.0]  # outer +, hole -
    assert np.array_equal(rasterize(contours, ring.shape), ring)

    diagonal = np.zeros((5, 5), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = True
    contours = trace_contours(diagonal)
    assert len(contours) == 2 and all(len(c) == 5 for c in contours)
    assert np.array_equal(rasterize(contours, diagonal.shape), diagonal)


def test_contours_of_random_masks_rasterize_back() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = ndimage.binary_opening(rng.random((40, 50)) > 0.45)
        contours = trace_contours(mask)
        assert np.array_equal(rasterize(contours, mask.shape), mask)
        for c in label_contours(mask, min_hole_pixels=0):  # simplified: still close
            corners = boundary_corners(mask)
            d = np.min(np.hypot(*(c[:, None, :] - corners[None]).transpose(2, 0, 1)), axis=1)
            assert d.max() == 0  # vertices are kept boundary corners


# -- GSPS -------------------------------------------------------------------------------


def test_gsps_is_valid_and_references_exactly_the_labelled_slices(
    gsps: Dataset, inp: EncodeInput, series: tuple[Path, ...], tmp_path: Path
) -> None:
    ps = validate(gsps, tmp_path / "gsps.dcm")
    assert ps.SOPClassUID == GSPS_CLASS and ps.Modality == "PR"
    assert ps.StudyInstanceUID == inp.study_uid
    assert ps.SeriesInstanceUID == inp.uid("gsps", "series") != inp.series_uid
    assert ps.SOPInstanceUID == inp.uid("gsps", "instance")
    labelled = {sop_uid(series[k]) for k in sorted(set(LABELLED_1) | set(LABELLED_2))}
    (ref_series,) = ps.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == inp.series_uid
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedImageSequence} == labelled
    assert {a.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            for a in ps.GraphicAnnotationSequence} == labelled

    # model identity: equipment, content label/description, layers, text
    assert ps.Manufacturer == "dicomnode" and ps.ManufacturerModelName == "lung_density"
    assert "lung_density 1.0.0" in ps.SoftwareVersions
    assert ps.ContentLabel == "LUNG_DENSITY"
    assert "lung_density 1.0.0" in ps.ContentDescription
    assert any(e.Manufacturer == "dicomnode" and e.ManufacturerModelName == "lung_density"
               for e in ps.ContributingEquipmentSequence)
    layers = {layer.GraphicLayer: layer for layer in ps.GraphicLayerSequence}
    assert set(layers) == {"L1_RIGHT_LUNG", "L2_LEFT_LUNG"}
    for lab in inp.manifest.labels:
        layer = layers[f"L{lab.value}_{lab.name.upper().replace(' ', '_')}"]
        expected = hd.color.CIELabColor.from_rgb(*lab.color).value
        assert tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) == expected
    for ann in ps.GraphicAnnotationSequence:
        (text,) = ann.TextObjectSequence
        name = "right lung" if ann.GraphicLayer.startswith("L1") else "left lung"
        assert text.UnformattedTextValue == f"{name} (lung_density 1.0.0)"
    # one annotation per image and label (so the text appears once per image and label)
    keys = [(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID, a.GraphicLayer)
            for a in ps.GraphicAnnotationSequence]
    assert len(keys) == len(set(keys)) == len(LABELLED_1) + len(LABELLED_2)
    # synthetic source without a window: the lung window for the lung model
    (voi,) = ps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == LUNG_WINDOW


def test_gsps_polylines_lie_on_the_mask_boundary(
    gsps: Dataset, labels: np.ndarray, series: tuple[Path, ...]
) -> None:
    for k in sorted(set(LABELLED_1) | set(LABELLED_2)):
        per_layer = graphic_objects(gsps, sop_uid(series[k]))
        for layer, polylines in per_layer.items():
            mask = labels[k] == int(layer[1])
            corners = boundary_corners(mask)
            for pts in polylines:
                assert np.array_equal(pts[0], pts[-1]), "closed polyline"
                d = np.min(np.hypot(*(pts[:, None, :] - corners[None]).transpose(2, 0, 1)),
                           axis=1)
                assert d.max() <= 1.0, f"slice {k} {layer}: vertex {d.max():.2f} px off the edge"
            # simplified contours still enclose the mask: no shift, no row/column swap
            filled = rasterize(polylines, mask.shape)
            iou = (filled & mask).sum() / (filled | mask).sum()
            assert iou > 0.97, f"slice {k} {layer}: IoU {iou:.3f}"
            n_edges = sum(len(c) - 1 for c in trace_contours(mask))
            assert sum(len(p) - 1 for p in polylines) < n_edges  # simplified
        assert len(per_layer.get("L2_LEFT_LUNG", [])) == (2 if k in LABELLED_2 else 0)  # hole


def test_gsps_single_pixel_label_on_its_image(series: tuple[Path, ...], tmp_path: Path) -> None:
    lab = np.zeros((N, SIZE, SIZE), dtype=np.uint8)
    lab[7, 30, 100] = 2  # row 30, column 100
    (ps,) = encode_gsps(make_input(series, lab))
    validate(ps, tmp_path / "one.dcm")
    (ann,) = ps.GraphicAnnotationSequence
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == sop_uid(series[7])
    (obj,) = ann.GraphicObjectSequence
    assert obj.GraphicType == "POLYLINE" and obj.GraphicAnnotationUnits == "PIXEL"
    pts = np.asarray(obj.GraphicData).reshape(-1, 2)
    # (column, row): the square around the pixel, whose centre (100.5, 30.5) is inside
    assert pts[:, 0].min() == 100 and pts[:, 0].max() == 101
    assert pts[:, 1].min() == 30 and pts[:, 1].max() == 31


def test_gsps_explicit_window_and_no_labels(inp: EncodeInput, series: tuple[Path, ...]) -> None:
    (ps,) = encode_gsps(inp, window=(40.0, 400.0))
    (voi,) = ps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)
    assert encode_gsps(make_input(series, np.zeros((N, SIZE, SIZE), np.uint8))) == []
    assert encode_sc(make_input(series, np.zeros((N, SIZE, SIZE), np.uint8))) == []


def test_bad_labels_are_refused(series: tuple[Path, ...]) -> None:
    with pytest.raises(ValueError, match="labels"):
        encode_gsps(make_input(series, np.zeros((N - 1, SIZE, SIZE), np.uint8)))
    bad = np.zeros((N, SIZE, SIZE), np.uint8)
    bad[3, 5, 5] = 9
    with pytest.raises(ValueError, match=r"values \[9\]"):
        encode_sc(make_input(series, bad))


# -- secondary capture ------------------------------------------------------------------


def test_sc_is_valid_one_image_per_labelled_slice(
    scs: list[Dataset], inp: EncodeInput, series: tuple[Path, ...], tmp_path: Path
) -> None:
    labelled = sorted(set(LABELLED_1) | set(LABELLED_2))
    assert len(scs) == len(labelled)
    assert len({ds.SOPInstanceUID for ds in scs}) == len(scs)
    for k, ds in zip(labelled, scs, strict=True):
        back = validate(ds, tmp_path / f"sc{k}.dcm")
        src = pydicom.dcmread(series[k], stop_before_pixels=True)
        assert back.SOPClassUID == SC_CLASS
        assert back.StudyInstanceUID == inp.study_uid
        assert back.SeriesInstanceUID == inp.uid("sc", "series")
        assert (back.SamplesPerPixel, back.PhotometricInterpretation, back.BitsAllocated) == \
            (3, "RGB", 8)
        assert back.BurnedInAnnotation == "YES"
        for text in (back.ImageComments, back.SeriesDescription):
            assert "NOT FOR DIAGNOSTIC USE" in text.upper() and "lung_density 1.0.0" in text
        (ref,) = back.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                   "FrameOfReferenceUID"):
            assert back[kw].value == src[kw].value, kw
        assert back.PatientID == src.PatientID
        assert any(e.Manufacturer == "dicomnode" for e in back.ContributingEquipmentSequence)


def test_sc_pixels_overlay_and_burned_in_text(
    scs: list[Dataset], inp: EncodeInput, labels: np.ndarray, series: tuple[Path, ...]
) -> None:
    k = 9  # both labels
    ds = next(d for d in scs if d.SourceImageSequence[0].ReferencedSOPInstanceUID
              == sop_uid(series[k]))
    rgb = ds.pixel_array.astype(int)
    src = pydicom.dcmread(series[k])
    hu = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    window = choose_window(inp.manifest, src, hu)
    assert window == LUNG_WINDOW  # CT + lung model
    frame = render_frame(hu, labels[k], inp.manifest, window)
    assert np.array_equal(frame.rgb, rgb)
    top, left, bottom, right = frame.text_box
    in_text = np.zeros(labels[k].shape, bool)
    in_text[top:bottom, left:right] = True

    gray = np.rint(np.clip((hu - (window[0] - window[1] / 2)) / window[1], 0, 1) * 255)
    # text: the pure yellow warning line, and the block differs from the plain image
    yellow = np.all(rgb == WARNING_COLOR, axis=2)
    assert yellow[in_text].sum() > 20 and not yellow[~in_text].any()
    assert (np.abs(rgb[in_text] - gray[in_text][:, None]).max(axis=1) > 30).sum() > 100

    # overlay colour where the labels are, plain gray elsewhere (outside the text)
    any_label = labels[k] > 0
    outside = ~any_label & ~in_text
    assert np.all(rgb[outside] == gray[outside][:, None])
    for lab in inp.manifest.labels:
        mask = (labels[k] == lab.value) & ~in_text
        color = np.asarray(lab.color)
        edge = mask & ~ndimage.binary_erosion(labels[k] == lab.value)
        inner = mask & ~edge
        assert np.all(rgb[edge] == color)
        expected = (1 - ALPHA) * gray[inner][:, None] + ALPHA * color
        assert np.abs(rgb[inner] - expected).max() <= 1
        assert np.all(np.ptp(rgb[inner], axis=1) > 0)  # coloured, not gray


def test_uids_are_deterministic(inp: EncodeInput, series: tuple[Path, ...],
                                labels: np.ndarray) -> None:
    again = make_input(series, labels)
    g1, g2 = encode_gsps(inp)[0], encode_gsps(again)[0]
    assert (g1.SeriesInstanceUID, g1.SOPInstanceUID) == (g2.SeriesInstanceUID, g2.SOPInstanceUID)
    s1, s2 = encode_sc(inp), encode_sc(again)
    assert [d.SOPInstanceUID for d in s1] == [d.SOPInstanceUID for d in s2]
    assert {d.SeriesInstanceUID for d in s1} == {d.SeriesInstanceUID for d in s2}
    revised = make_input(series, labels, revision=2)
    assert encode_gsps(revised)[0].SOPInstanceUID != g1.SOPInstanceUID
    assert not {d.SOPInstanceUID for d in encode_sc(revised)} & {d.SOPInstanceUID for d in s1}


def test_choose_window_order() -> None:
    manifest = load_manifest(MODEL_DIR)
    other = manifest.model_copy(update={"name": "liver_seg", "labels": tuple(
        lab.model_copy(update={"name": f"organ {lab.value}",
                               "type": lab.type.model_copy(update={"meaning": "Liver"})})
        for lab in manifest.labels)})
    src = Dataset()
    src.Modality = "CT"
    values = np.linspace(-1000, 1000, 10000).reshape(100, 100)
    assert choose_window(manifest, src, values) == LUNG_WINDOW
    assert choose_window(manifest, src, values, (10, 20)) == (10.0, 20.0)
    src.WindowCenter, src.WindowWidth = [40, 300], [400, 1500]
    assert choose_window(other, src, values) == (40.0, 400.0)
    del src.WindowCenter, src.WindowWidth
    c, w = choose_window(other, src, values)
    assert abs(c) < 1 and 1900 < w < 2000  # 1st..99th percentile


# -- the real chest CT ------------------------------------------------------------------


def test_real_chest_ct(tmp_path: Path) -> None:
    folder = shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
    paths = sorted_series(dicom_files(folder))
    hu = np.stack([
        (lambda d: d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept))(
            pydicom.dcmread(p)) for p in paths])
    # threshold mask: air inside the body, split at the image's middle column (patient
    # right = low columns for this axial, IOP 1\0\0\0\1\0 series)
    lab = np.zeros(hu.shape, np.uint8)
    cols = np.arange(hu.shape[2])[None]
    for k in range(hu.shape[0]):
        cc, n = ndimage.label(hu[k] < -400)
        border = set(np.unique(np.r_[cc[0], cc[-1], cc[:, 0], cc[:, -1]]).tolist())
        inside = ndimage.binary_opening(np.isin(cc, [i for i in range(1, n + 1)
                                                     if i not in border]), iterations=2)
        cc, n = ndimage.label(inside)
        sizes = ndimage.sum(inside, cc, range(1, n + 1))
        lungs = np.isin(cc, [i + 1 for i, s in enumerate(sizes) if s > 500])
        lab[k][lungs & (cols < hu.shape[2] // 2)] = 1
        lab[k][lungs & (cols >= hu.shape[2] // 2)] = 2
    inp = make_input(paths, lab)
    labelled = [k for k in range(len(paths)) if lab[k].any()]
    assert len(labelled) > 20

    with pytest.warns(UserWarning, match="person name"):  # the source's "Lung_Dx-A0001"
        (ps,) = encode_gsps(inp)
    validate(ps, tmp_path / "gsps.dcm")
    assert len(ps.ReferencedSeriesSequence[0].ReferencedImageSequence) == len(labelled)
    points = [int(o.NumberOfGraphicPoints) for a in ps.GraphicAnnotationSequence
              for o in a.GraphicObjectSequence]
    assert sum(points) < 1000 * len(labelled)  # a few hundred points a lung outline
    # the source's own window (mediastinal) is copied into the presentation state
    assert float(ps.SoftcopyVOILUTSequence[0].WindowWidth[0]) == float(
        pydicom.dcmread(paths[0], stop_before_pixels=True).WindowWidth[0])

    with pytest.warns(UserWarning, match="person name"):
        scs = encode_sc(inp)
    assert len(scs) == len(labelled)
    mid = len(scs) // 2
    for i in (0, mid, len(scs) - 1):
        validate(scs[i], tmp_path / f"sc{i}.dcm")

    # pictures for a person to look at: the SC frame, and the GSPS contours drawn 2x
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(scs[mid].pixel_array).save(ARTIFACTS / "sc_chest_ct.png")
    k = labelled[mid]
    gray = np.clip((hu[k] - (LUNG_WINDOW[0] - LUNG_WINDOW[1] / 2)) / LUNG_WINDOW[1], 0, 1)
    zoom = 2
    img = Image.fromarray(np.rint(gray * 255).astype(np.uint8)).resize(
        (hu.shape[2] * zoom, hu.shape[1] * zoom), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(img)
    colors = {f"L{lab.value}": tuple(lab.color) for lab in inp.manifest.labels}
    for layer, polylines in graphic_objects(ps, sop_uid(paths[k])).items():
        for pts in polylines:
            draw.line([(x * zoom, y * zoom) for x, y in pts], fill=colors[layer[:2]], width=2)
    img.save(ARTIFACTS / "gsps_chest_ct.png")


def test_encode_fallbacks_do_not_import_torch() -> None:
    code = ("import sys, dicomnode.encode.gsps, dicomnode.encode.sc; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
