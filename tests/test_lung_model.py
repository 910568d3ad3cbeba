"""The reference model ``models/lung_density``: lung segmentation and density measures.

* a real chest CT (TCIA Lung-PET-CT-Dx, shared data; skipped without it),
* a synthetic phantom with an analytic lung volume (no shared data needed), also
  mirrored, to prove that "right"/"left" follow the patient geometry, not the index,
* refusal of non-CT input, and CPU == CUDA where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import ROOT, dicom_files, shared

from dicomnode.core.manifest import load_manifest
from dicomnode.inference.geometry import Volume
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

MODEL_DIR = ROOT / "models" / "lung_density"
HU = "[hnsf'U]"


def _import_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lung_density_model_under_test", MODEL_DIR / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODEL = _import_model()


def _model(device: str = "cpu"):  # type: ignore[no-untyped-def]
    runtime = MODEL.LungDensityModel(load_manifest(MODEL_DIR), MODEL_DIR, device)
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return _model("cpu")


@pytest.fixture(scope="module")
def real_ct() -> Volume:
    folder = shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
    return load_series(dicom_files(folder))


@pytest.fixture(scope="module")
def real_prediction(model, real_ct):  # type: ignore[no-untyped-def]
    return model.predict(real_ct)


# The phantom (dicomnode.synthetic): 60 slices of 2.5 mm, 256 x 256 pixels of 350/256 mm.
# Each lung is an ellipse with semi-axes (0.28 s, 0.45 s) in the image's normalised
# [-1, 1] coordinates, s = max(0.2, 1 - |z|) with z running -1..1 over the slices.
PH_SLICES, PH_SIZE, PH_THICK = 60, 256, 2.5


def _phantom_lung_ml() -> float:
    mm_per_unit = (350.0 / PH_SIZE) * (PH_SIZE - 1) / 2  # np.mgrid[-1:1:n*1j] spans n-1 pixels
    total = 0.0
    for i in range(PH_SLICES):
        s = max(0.2, 1 - abs(2 * i / (PH_SLICES - 1) - 1))
        total += math.pi * (0.28 * s) * (0.45 * s) * mm_per_unit**2 * PH_THICK
    return total / 1000.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    folder = tmp_path_factory.mktemp("lung_phantom")
    paths = make_ct_series(folder, n_slices=PH_SLICES, rows=PH_SIZE, cols=PH_SIZE,
                           slice_thickness=PH_THICK, seed=7)
    return load_series(paths)


def _centroid_x(volume: Volume, labels: np.ndarray, value: int) -> float:
    """Patient x (LPS, +x = patient's left) of the centroid of one label."""
    kij = np.argwhere(labels == value).mean(axis=0)
    return float(volume.index_to_patient(kij[None])[0, 0])


def _mirror_geometry(volume: Volume, array: np.ndarray) -> Volume:
    """The same patient stored with the columns reversed: flip the array and the row
    direction, and move the origin to what is now column 0. Anatomy is unchanged."""
    shift = volume.row_direction * volume.spacing[2] * (volume.shape[2] - 1)
    return dataclasses.replace(
        volume,
        array=np.ascontiguousarray(array[:, :, ::-1]),
        row_direction=-volume.row_direction,
        origin=volume.origin + shift,
    )


# -- the manifest ----------------------------------------------------------------------


def test_manifest_defines_labels_with_snomed_codes() -> None:
    manifest = load_manifest(MODEL_DIR)
    assert (manifest.name, manifest.version, manifest.runtime) == ("lung_density", "1.0.0", "builtin")
    assert manifest.entry_point == "model.py:LungDensityModel"
    by_value = {label.value: label for label in manifest.labels}
    assert by_value[1].name == "right lung" and by_value[1].type.value == "3341006"
    assert by_value[2].name == "left lung" and by_value[2].type.value == "44029006"
    for label in manifest.labels:
        assert (label.category.value, label.category.scheme) == ("91723000", "SCT")
    assert manifest.accepts.modalities == ("CT",) and manifest.accepts.min_slices >= 20
    assert set(manifest.outputs) == {"seg", "sr"}


def test_loads_through_the_builtin_runtime() -> None:
    from dicomnode.inference.runtimes import load_model

    runtime = load_model(MODEL_DIR, "cpu")
    assert type(runtime).__name__ == "LungDensityModel"


# -- the real chest CT -----------------------------------------------------------------


def test_real_ct_lung_volumes_and_sides(real_ct: Volume, real_prediction) -> None:  # type: ignore[no-untyped-def]
    p = real_prediction
    labels = p.labels
    assert labels.shape == real_ct.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    assert (p.model_name, p.model_version, p.device) == ("lung_density", "1.0.0", "cpu")

    # Coverage: the series spans z = -439 .. -124 mm (64 x 5 mm = 320 mm), from below
    # the diaphragm to the neck. The lungs end inside it (no lung in the first or last
    # slice), so the whole lungs are covered and the adult range for the *total* lung
    # volume on an inspiratory CT applies unchanged: 2 to 8 litres.
    z_slices = np.flatnonzero(labels.any(axis=(1, 2)))
    assert 0 < z_slices[0] and z_slices[-1] < real_ct.shape[0] - 1
    lung_height_mm = (z_slices[-1] - z_slices[0] + 1) * real_ct.spacing[0]
    assert 180 <= lung_height_mm <= 320  # apex to costophrenic recess in an adult

    m = p.measurements
    total = m["total"]["volume"]
    assert total[1] == "ml" and 2000 <= total[0] <= 8000
    right, left = m["right lung"]["volume"][0], m["left lung"]["volume"][0]
    assert right > 0.2 * total[0] and left > 0.2 * total[0]
    assert right + left == pytest.approx(total[0])
    # the right lung (3 lobes) is usually the larger one; for this patient it is, also
    # because the left upper lobe holds a mass (soft tissue, not lung air)
    assert right > left

    # anatomy: the left lung lies at larger patient x (LPS) than the right lung
    assert _centroid_x(real_ct, labels, 2) > _centroid_x(real_ct, labels, 1)
    # and the trachea (tracked from the neck) is in neither lung: no lung in the
    # 3 head-most slices, where the scan shows the neck
    assert not labels[-3:].any()


def test_real_ct_density_measures(real_ct: Volume, real_prediction) -> None:  # type: ignore[no-untyped-def]
    m = real_prediction.measurements
    for name in ("right lung", "left lung", "total"):
        laa, pd15, mld = m[name]["LAA%-950"], m[name]["PD15"], m[name]["mean density"]
        assert laa[1] == "%" and pd15[1] == HU and mld[1] == HU
        assert 0 <= laa[0] <= 100
        assert -1000 <= pd15[0] <= -700
        assert -950 <= mld[0] <= -600
    # the numbers are what numpy computes on the unsmoothed HU inside the mask
    hu = real_ct.array[real_prediction.labels == 1]
    right = m["right lung"]
    assert right["volume"][0] == pytest.approx(hu.size * real_ct.voxel_volume_ml)
    assert right["mean density"][0] == pytest.approx(float(hu.mean()), abs=1e-3)
    assert right["LAA%-950"][0] == pytest.approx(100 * float((hu < -950).mean()))
    assert right["PD15"][0] == pytest.approx(float(np.percentile(hu, 15)))


# -- the synthetic phantom -------------------------------------------------------------


def test_phantom_volumes_match_the_analytic_volume(model, phantom: Volume) -> None:  # type: ignore[no-untyped-def]
    p = model.predict(phantom)
    expected = _phantom_lung_ml()  # ~602 ml per lung
    # tolerance 3%: the discretised ellipse edge and the -320 HU boundary re-threshold
    # are the only differences (the phantom has sharp edges and 15 HU noise)
    for name in ("right lung", "left lung"):
        assert p.measurements[name]["volume"][0] == pytest.approx(expected, rel=0.03)
    assert p.measurements["total"]["volume"][0] == pytest.approx(2 * expected, rel=0.03)
    # lungs are -850 HU +- 15: nothing below -950, PD15 and mean near -850
    assert p.measurements["total"]["LAA%-950"][0] < 0.01
    assert p.measurements["total"]["PD15"][0] == pytest.approx(-865, abs=10)
    assert p.measurements["total"]["mean density"][0] == pytest.approx(-850, abs=5)
    # the phantom's +x is the image's right-hand half: the left lung is there
    assert _centroid_x(phantom, p.labels, 2) > 0 > _centroid_x(phantom, p.labels, 1)


def test_labels_follow_anatomy_not_array_index(model, phantom: Volume) -> None:  # type: ignore[no-untyped-def]
    # make the phantom asymmetric: fill the lower half of the lung at small column
    # index (patient right, with row_direction +x) with soft tissue
    array = phantom.array.copy()
    half = phantom.shape[2] // 2
    lower = array[: phantom.shape[0] // 2, :, :half]
    lower[lower < -320] = 40.0
    base = dataclasses.replace(phantom, array=array)

    p = model.predict(base)
    vol = {n: p.measurements[n]["volume"][0] for n in ("right lung", "left lung")}
    assert vol["right lung"] < 0.8 * vol["left lung"]

    # 1) same patient, columns stored the other way round (array and row_direction
    #    flipped): the same anatomy, so the same volumes, and the label map is the
    #    mirror image of the first one
    same = model.predict(_mirror_geometry(base, array))
    for n in vol:
        assert same.measurements[n]["volume"][0] == pytest.approx(vol[n], rel=1e-3)
    agree = (same.labels[:, :, ::-1] == p.labels).mean()
    assert agree > 0.999
    assert _centroid_x(base, p.labels, 2) > _centroid_x(base, p.labels, 1)

    # 2) the pixel data mirrored but the geometry kept: now the reduced lung lies at
    #    larger patient x, so it is the LEFT lung; label values swap in the array
    mirrored = dataclasses.replace(base, array=np.ascontiguousarray(array[:, :, ::-1]))
    swapped = model.predict(mirrored)
    assert swapped.measurements["left lung"]["volume"][0] == pytest.approx(vol["right lung"], rel=1e-3)
    assert swapped.measurements["right lung"]["volume"][0] == pytest.approx(vol["left lung"], rel=1e-3)
    expected = np.choose(p.labels[:, :, ::-1], [0, 2, 1]).astype(np.uint8)
    assert (swapped.labels == expected).mean() > 0.999


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["MR", "PT", "", "ct-ish"])
def test_non_ct_input_is_refused(model, phantom: Volume, modality: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MODEL.UnsupportedVolumeError, match="needs a CT series"):
        model.predict(dataclasses.replace(phantom, modality=modality))
    assert issubclass(MODEL.UnsupportedVolumeError, ValueError)


def test_too_few_slices_and_non_axial_are_refused(model, phantom: Volume) -> None:  # type: ignore[no-untyped-def]
    few = dataclasses.replace(phantom, array=phantom.array[:5])
    with pytest.raises(MODEL.UnsupportedVolumeError, match="at least 20 slices"):
        model.predict(few)
    coronal = dataclasses.replace(phantom, slice_direction=np.array([0.0, 1.0, 0.0]))
    with pytest.raises(MODEL.UnsupportedVolumeError, match="axial"):
        model.predict(coronal)


def test_predict_before_load_is_an_error() -> None:
    runtime = MODEL.LungDensityModel(load_manifest(MODEL_DIR), MODEL_DIR, "cpu")
    with pytest.raises(RuntimeError, match="load"):
        runtime.predict(None)


# -- the GPU ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(model, phantom: Volume) -> None:  # type: ignore[no-untyped-def]
    gpu = _model("cuda")
    volumes = [phantom]
    try:
        folder = shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
        volumes.append(load_series(dicom_files(folder)))
    except pytest.skip.Exception:
        pass
    for volume in volumes:
        on_cpu, on_gpu = model.predict(volume), gpu.predict(volume)
        assert on_gpu.device.startswith("cuda")
        assert (on_cpu.labels == on_gpu.labels).mean() > 0.9999
        for name, measures in on_cpu.measurements.items():
            for key, (value, unit) in measures.items():
                assert on_gpu.measurements[name][key][1] == unit
                assert on_gpu.measurements[name][key][0] == pytest.approx(value, rel=1e-3, abs=0.05)
