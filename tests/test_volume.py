"""load_series: series -> Volume (dicomnode/inference/volume.py).

The synthetic tests run anywhere; the real-data tests use ../shared/data and skip
cleanly without it. No test asserts a timing (bench/volume.py measures speed).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_files, shared

from dicomnode.errors import InconsistentSeriesError, InvalidInstanceError
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

CHEST = ("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
TILT = ("rordenlab-dcm_qa_ct", "GE_head_gantry_tilt")
SAGITTAL = ("rordenlab-dcm_qa_decubitus", "HFS_t1_fl2d_sag")
NEMA = ("nema-wg04-compression-samples",)


def reference_hu(path: Path) -> np.ndarray:
    """pydicom's ``pixel_array * slope + intercept`` of one file, as float32."""
    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return (ds.pixel_array * slope + intercept).astype(np.float32)


def rewrite(path: Path, out: Path, change: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def reasons_of(exc: pytest.ExceptionInfo[InconsistentSeriesError]) -> str:
    return "\n".join(exc.value.reasons)


# --------------------------------------------------------------------------- synthetic


@pytest.fixture
def synthetic(tmp_path: Path) -> list[Path]:
    return make_ct_series(tmp_path / "ct", n_slices=12, rows=48, cols=40, slice_thickness=2.5)


def test_synthetic_series_loads_exactly(synthetic: list[Path]) -> None:
    shuffled = synthetic[:]
    random.Random(7).shuffle(shuffled)
    vol = load_series(shuffled)
    assert vol.shape == (12, 48, 40)
    assert vol.array.dtype == np.float32
    assert vol.spacing == pytest.approx((2.5, 350 / 40, 350 / 40))
    np.testing.assert_array_equal(vol.slice_direction, [0, 0, 1])
    assert np.all(np.diff(vol.slice_positions) > 0)
    for k, path in enumerate(synthetic):  # written in increasing z
        ds = pydicom.dcmread(path)
        assert vol.sop_instance_uids[k] == ds.SOPInstanceUID
        np.testing.assert_array_equal(vol.array[k], ds.pixel_array.astype(np.float32) - 1024)
    assert vol.slice_positions[0] == pytest.approx(-15.0)
    np.testing.assert_allclose(vol.origin, [-175, -175, -15])
    np.testing.assert_allclose(vol.index_to_patient(np.array([[11, 0, 0]])), [[-175, -175, 12.5]])
    assert vol.modality == "CT" and vol.series_uid and vol.frame_of_reference_uid


def test_workers_do_not_change_the_result(synthetic: list[Path]) -> None:
    one = load_series(synthetic, workers=1)
    many = load_series(synthetic, workers=4)
    np.testing.assert_array_equal(one.array, many.array)
    assert one.sop_instance_uids == many.sop_instance_uids


def test_compressed_series_decodes_in_parallel(synthetic: list[Path], tmp_path: Path) -> None:
    """RLE Lossless (pydicom's own encoder) slices, decoded by the thread pool."""
    out = tmp_path / "rle"
    out.mkdir()
    paths = [rewrite(p, out / p.name, lambda ds: ds.compress(pydicom.uid.RLELossless))
             for p in synthetic]
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(load_series(paths, workers=3).array, load_series(synthetic).array)
    mixed = paths[::2] + synthetic[1::2]  # one series may mix transfer syntaxes
    np.testing.assert_array_equal(load_series(mixed).array, load_series(synthetic).array)


def test_arguments_are_validated(synthetic: list[Path]) -> None:
    with pytest.raises(ValueError, match="paths"):
        load_series([])
    with pytest.raises(ValueError, match="workers"):
        load_series(synthetic, workers=0)
    with pytest.raises(ValueError, match="uneven"):
        load_series(synthetic, uneven="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tilt"):
        load_series(synthetic, tilt="yes")  # type: ignore[arg-type]


def test_non_integer_rescale_is_exact_in_float32(synthetic: list[Path], tmp_path: Path) -> None:
    def change(ds: pydicom.Dataset) -> None:
        ds.RescaleSlope = "0.37"
        ds.RescaleIntercept = "-1000.3"

    paths = [rewrite(p, tmp_path / p.name, change) for p in synthetic]
    vol = load_series(paths)
    for k, path in enumerate(paths):
        np.testing.assert_array_equal(vol.array[k], reference_hu(path))


def test_monochrome1_is_not_inverted(synthetic: list[Path], tmp_path: Path) -> None:
    def change(ds: pydicom.Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"

    paths = [rewrite(p, tmp_path / p.name, change) for p in synthetic]
    vol = load_series(paths)
    assert vol.metadata["photometric_interpretation"] == "MONOCHROME1"
    np.testing.assert_array_equal(vol.array[0], reference_hu(paths[0]))
    with pytest.raises(InconsistentSeriesError, match="photometric"):
        load_series(paths[:6] + synthetic[6:])


def test_duplicate_position_refused(synthetic: list[Path], tmp_path: Path) -> None:
    def change(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = pydicom.uid.generate_uid()

    copy = rewrite(synthetic[5], tmp_path / "copy.dcm", change)
    with pytest.raises(InconsistentSeriesError, match="duplicated slice positions"):
        load_series([*synthetic, copy])


def test_missing_middle_slice_refused(synthetic: list[Path]) -> None:
    with pytest.raises(InconsistentSeriesError) as exc:
        load_series(synthetic[:6] + synthetic[7:])
    assert "missing slice" in reasons_of(exc)
    assert "2.0 x the median" in reasons_of(exc)
    # A missing slice is refused even when uneven spacing is accepted.
    with pytest.raises(InconsistentSeriesError, match="missing slice"):
        load_series(synthetic[:6] + synthetic[7:], uneven="keep")


def test_mixed_series_refused(synthetic: list[Path], tmp_path: Path) -> None:
    other = make_ct_series(tmp_path / "other", n_slices=2, rows=48, cols=40, seed=3)
    with pytest.raises(InconsistentSeriesError, match="mixed series"):
        load_series([*synthetic, *other])


def test_missing_position_refused(synthetic: list[Path], tmp_path: Path) -> None:
    def change(ds: pydicom.Dataset) -> None:
        del ds.ImagePositionPatient

    broken = rewrite(synthetic[3], tmp_path / "noipp.dcm", change)
    paths = [p if p != synthetic[3] else broken for p in synthetic]
    with pytest.raises(InconsistentSeriesError, match="missing or invalid ImagePositionPatient"):
        load_series(paths)


def test_mixed_size_and_orientation_refused(synthetic: list[Path], tmp_path: Path) -> None:
    def oblique(ds: pydicom.Dataset) -> None:
        c, s = math.cos(0.3), math.sin(0.3)
        ds.ImageOrientationPatient = [c, s, 0, -s, c, 0]

    paths = synthetic[:-1] + [rewrite(synthetic[-1], tmp_path / "oblique.dcm", oblique)]
    with pytest.raises(InconsistentSeriesError, match="mixed orientation"):
        load_series(paths)
    small = make_ct_series(tmp_path / "small", n_slices=1, rows=32, cols=40,
                           series_uid=str(pydicom.dcmread(synthetic[0]).SeriesInstanceUID))
    with pytest.raises(InconsistentSeriesError, match="image size"):
        load_series([*synthetic, *small])


def test_synthetic_tilt_refused_and_kept(synthetic: list[Path], tmp_path: Path) -> None:
    paths = []
    for k, p in enumerate(synthetic):
        def change(ds: pydicom.Dataset, k: int = k) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + 0.5 * 2.5 * k, z]  # 0.5 mm per mm along z

        paths.append(rewrite(p, tmp_path / p.name, change))
    with pytest.raises(InconsistentSeriesError, match="gantry tilt"):
        load_series(paths)
    vol = load_series(paths, tilt="keep")
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(math.degrees(math.atan(0.5)))
    np.testing.assert_allclose(vol.metadata["stack_direction"],
                               np.array([0, 0.5, 1]) / math.hypot(0.5, 1))


def test_multi_frame_refused() -> None:
    path = shared("dcmqi-test-data", "seg-tiny-23x38x3", "multiframe", "mf.dcm")
    with pytest.raises(InconsistentSeriesError, match="multi-frame"):
        load_series([path])


# --------------------------------------------------------------------------- real data


def test_real_chest_ct_loads() -> None:
    files = dicom_files(shared(*CHEST))
    assert len(files) == 64
    vol = load_series(files[::-1])
    assert vol.shape == (64, 512, 512)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    ps = [float(v) for v in first.PixelSpacing]
    assert vol.spacing == pytest.approx((5.0, ps[0], ps[1]))
    np.testing.assert_allclose(np.r_[vol.row_direction, vol.col_direction],
                               [float(v) for v in first.ImageOrientationPatient])
    np.testing.assert_allclose(vol.slice_direction, [0, 0, 1])
    np.testing.assert_allclose(vol.slice_positions[[0, -1]], [-439, -124])
    assert np.all(np.diff(vol.slice_positions) == pytest.approx(5.0))
    assert vol.study_uid == first.StudyInstanceUID
    assert vol.series_uid == first.SeriesInstanceUID
    # HU: air outside the body at about -1000, nothing below the padding value.
    assert vol.array.min() >= -1024
    assert np.median(vol.array[:, :40, :40]) == pytest.approx(-1000, abs=50)
    soft_tissue = np.mean((vol.array > -100) & (vol.array < 100))
    assert 0.05 < soft_tissue < 0.6
    assert vol.array.max() > 500  # bone
    assert 20 < float(np.median(vol.array[32, 200:300, 230:280])) < 80 or vol.array.max() > 1000
    uids = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
    for k, uid in enumerate(vol.sop_instance_uids):
        assert uids[uid] == pytest.approx(vol.slice_positions[k])


def test_real_chest_ct_slices_equal_pydicom() -> None:
    files = dicom_files(shared(*CHEST))
    vol = load_series(files)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    for k, uid in enumerate(vol.sop_instance_uids):
        np.testing.assert_array_equal(vol.array[k], reference_hu(by_uid[uid]))


def test_real_chest_ct_matches_monai_loadimage() -> None:
    """MONAI LoadImage(PydicomReader) returns [j, i, InstanceNumber order]."""
    monai = pytest.importorskip("monai")
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    folder = shared(*CHEST)
    vol = load_series(dicom_files(folder))
    img = LoadImage(reader=PydicomReader(), image_only=True)(str(folder))
    theirs = np.asarray(img).transpose(2, 1, 0)  # -> [instance order, i, j]
    by_instance = np.argsort(np.asarray(vol.metadata["instance_numbers"]), kind="stable")
    np.testing.assert_array_equal(vol.array[by_instance], theirs)
    assert monai.__version__


@pytest.mark.parametrize("folder", ["JPLL", "JLSL", "JLSN", "J2KR", "J2KI", "RLE"])
@pytest.mark.parametrize("image", ["CT1", "CT2", "MR1", "MR4"])
def test_nema_compressed_matches_reference(folder: str, image: str) -> None:
    """Lossless: identical. JPEG-LS near-lossless: |diff| <= 4 stored units (NEAR=4 in
    this set). JPEG 2000 lossy: mean |diff| <= 1 % of the reference range, r >= 0.99."""
    root = shared(*NEMA)
    ref = load_series([root / "REF" / f"{image}_UNC.dcm"])
    vol = load_series([root / folder / f"{image}_{folder}.dcm"])
    np.testing.assert_array_equal(ref.array[0], reference_hu(root / "REF" / f"{image}_UNC.dcm"))
    diff = np.abs(vol.array.astype(np.float64) - ref.array)
    if folder == "JLSN":
        slope = float(pydicom.dcmread(root / "REF" / f"{image}_UNC.dcm").get("RescaleSlope", 1))
        assert diff.max() <= 4 * abs(slope) + 1e-3
    elif folder == "J2KI":
        value_range = float(ref.array.max() - ref.array.min())
        assert diff.mean() <= 0.01 * value_range
        assert np.corrcoef(vol.array.ravel(), ref.array.ravel())[0, 1] >= 0.99
    else:
        np.testing.assert_array_equal(vol.array, ref.array)


def test_undecodable_jpeg_extended_refused_clearly() -> None:
    path = shared(*NEMA, "JPLY", "MR1_JPLY.dcm")
    with pytest.raises(InvalidInstanceError, match="could not be decoded"):
        load_series([path])


def test_dcm_qa_ts_all_transfer_syntaxes_identical() -> None:
    root = shared("rordenlab-dcm_qa_ts")
    files = [root / f"{n}.dcm" for n in range(1, 10)]
    ref = load_series([files[0]])
    np.testing.assert_array_equal(ref.array[0], reference_hu(files[0]))
    for path in files[1:]:
        vol = load_series([path])
        np.testing.assert_array_equal(vol.array, ref.array, err_msg=path.name)
    # Nine instances of one image at one position are not a volume.
    with pytest.raises(InconsistentSeriesError, match="duplicated slice positions"):
        load_series(files)


def test_tilt_and_uneven_spacing_refused_with_reasons() -> None:
    files = dicom_files(shared(*TILT))
    with pytest.raises(InconsistentSeriesError) as exc:
        load_series(files)
    text = reasons_of(exc)
    assert "gantry tilt" in text and "18.50 degrees" in text
    assert "uneven slice spacing" in text
    assert "missing slice" not in text
    with pytest.raises(InconsistentSeriesError) as exc:
        load_series(files, tilt="keep")
    assert "uneven" in reasons_of(exc) and "tilt" not in reasons_of(exc)
    with pytest.raises(InconsistentSeriesError) as exc:
        load_series(files, uneven="keep")
    assert "gantry tilt" in reasons_of(exc) and "uneven" not in reasons_of(exc)


def test_tilt_and_uneven_spacing_kept() -> None:
    files = dicom_files(shared(*TILT))
    vol = load_series(files, tilt="keep", uneven="keep")
    assert vol.shape == (28, 512, 512)
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert vol.metadata["uneven_spacing"] is True
    steps = np.diff(vol.slice_positions)
    assert steps.min() == pytest.approx(1.08, abs=0.01)
    assert steps.max() == pytest.approx(7.0, abs=0.01)
    np.testing.assert_allclose(vol.slice_positions[[0, -1]], [-33.67, 110.42], atol=0.01)
    # Slices as acquired: slice k is the file whose position is k-th along the normal.
    normal = vol.slice_direction
    for k, path in enumerate(files):  # 01..28 increase along the normal
        ds = pydicom.dcmread(path)
        assert vol.sop_instance_uids[k] == ds.SOPInstanceUID
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        assert ipp @ normal == pytest.approx(vol.slice_positions[k])
        np.testing.assert_allclose(vol.metadata["image_positions"][k], ipp)
    np.testing.assert_array_equal(vol.array[5], reference_hu(files[5]))
    assert vol.array.min() < -900 and vol.array.max() > 1000  # air and bone (signed, HU)


def test_sagittal_mr_slice_direction() -> None:
    files = dicom_files(shared(*SAGITTAL))
    vol = load_series(files)
    assert vol.shape == (35, 256, 256)
    np.testing.assert_allclose(vol.row_direction, [0, 1, 0])
    np.testing.assert_allclose(vol.col_direction, [0, 0, -1])
    np.testing.assert_allclose(vol.slice_direction, [-1, 0, 0], atol=1e-9)
    assert vol.spacing[0] == pytest.approx(4.8, abs=0.01)
    x = vol.metadata["image_positions"][:, 0]
    assert np.all(np.diff(x) < 0)  # increasing k = towards the patient's right (-x)
    assert x[0] == pytest.approx(81.6, abs=0.1) and x[-1] == pytest.approx(-81.6, abs=0.1)
    assert vol.modality == "MR"
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    np.testing.assert_array_equal(vol.array[17], reference_hu(by_uid[vol.sop_instance_uids[17]]))


def test_real_mixed_series_refused() -> None:
    chest = dicom_files(shared(*CHEST))
    mr = dicom_files(shared(*SAGITTAL))
    with pytest.raises(InconsistentSeriesError) as exc:
        load_series([*chest[:5], mr[0]])
    text = reasons_of(exc)
    assert "mixed series" in text and "image size" in text
