"""Zoo bundles' own orientation, resampling and inversion land labels on the source grid.

The real MONAI model-zoo configs (spleen_ct_segmentation, wholeBody_ct_segmentation,
shared data) run through the ``monai_bundle`` runtime with stand-in networks whose
output is a known function of their input (tests/bundle_probes.py):

* ``ThresholdNet`` (classes by preprocessed intensity): after the bundle's
  ``Orientationd``/``Spacingd``/intensity transforms, the network and the bundle's
  ``Invertd``, every source voxel must get the class of its own intensity. Exactly,
  on the *interior*: voxels whose whole resampling neighbourhood has one class, at
  least ``MARGIN`` (bundle intensity units) from a threshold. Why that suffices:
  ``Spacingd`` interpolates linearly (a convex combination of source voxels at most
  one source step away), the classes are intervals (convex), the inversion is
  nearest (a target voxel at most half a target step away) or linear on softmax
  probabilities (a convex combination keeps the dominant class), so a voxel whose
  neighbourhood within one target plus one source step is of one class keeps it.
  The margin covers the volume-dependent normalisation of wholeBody
  (``NormalizeIntensityd``/``ScaleIntensityd`` on the resampled volume). Outside the
  interior (class boundaries) resampling legitimately changes labels.
* ``AxisNet`` (which network axis the intensity increases along) on ramps along
  the patient's right, anterior and superior: the network must see the RAS axes
  (class 1, 2, 3), whatever the source orientation. An intensity-only network cannot
  tell a transposed or mirrored hand-over from a correct one; this one can.

Orientations: axial head-first, feet-first, mirrored columns, rotated, gantry-tilted,
sagittal, coronal, decubitus left/right (CT and MR), oblique (synthetic, small), and
the real tilted head CT (18.5 degrees, uneven steps 1.08-7 mm), the real sagittal MR
and the real chest CT (blocks of them, to stay fast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("nibabel")

from bundle_probes import AxisNet, ThresholdNet, probe_bundle  # noqa: E402
from conftest import dicom_files, shared  # noqa: E402
from scipy import ndimage  # noqa: E402

from dicomnode.core.manifest import load_manifest  # noqa: E402
from dicomnode.inference.bundle_geometry import (  # noqa: E402
    slice_origins,
    sub_volume,
    to_metatensor,
)
from dicomnode.inference.geometry import Volume  # noqa: E402
from dicomnode.inference.runtimes.monai_bundle import MonaiBundleRuntime  # noqa: E402
from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic_oriented import (  # noqa: E402
    blocks_phantom,
    oriented,
    sample,
    to_volume,
    write_series,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: Thresholds in each bundle's preprocessed intensity units (spleen: [0, 1] from
#: -57..164 HU, i.e. -35 and 142 HU; wholeBody: [-1, 1] after normalisation). With the
#: blocks phantom (-1000, -850, 40, 300, 700 HU) both split it into air/lung, soft
#: tissue, bright; on real CT soft tissue (with its noise) stays clear of both.
THRESHOLDS = {"spleen_ct_segmentation": (0.1, 0.9), "wholeBody_ct_segmentation": (-0.5, 0.4)}
MARGIN = 0.02
SHAPE, SPACING = (30, 40, 40), (3.4, 2.6, 2.6)
KINDS = ("axial_hfs", "axial_ffs", "axial_mirrored", "axial_rotated", "tilted", "sagittal",
         "coronal", "decubitus_left", "decubitus_right", "oblique")


# ---------------------------------------------------------------- cases


def synthetic(kind: str, field: Callable[[np.ndarray], np.ndarray] | None = None,
              modality: str = "CT") -> Volume:
    geometry = oriented(kind, SHAPE, SPACING, centre=(3.0, -4.0, 2.0), angle_deg=25.0)
    return to_volume(geometry, sample(geometry, field or blocks_phantom()), modality)


def real(name: str) -> Volume:
    if name == "tilted head CT":
        files = dicom_files(shared("rordenlab-dcm_qa_ct", "GE_head_gantry_tilt"))
        volume = load_series(files, tilt="keep", uneven="keep")
        return sub_volume(volume, slice(None), slice(180, 320), slice(186, 326))
    if name == "sagittal MR":
        files = dicom_files(shared("rordenlab-dcm_qa_decubitus", "HFS_t1_fl2d_sag"))
        return sub_volume(load_series(files), slice(None), slice(20, 140), slice(20, 140))
    files = dicom_files(shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB"))
    return sub_volume(load_series(files), slice(8, 56), slice(170, 290), slice(90, 210))


CASES = [*KINDS, "decubitus_left MR", "tilted head CT", "sagittal MR", "chest CT"]


def case_volume(case: str, field: Callable[[np.ndarray], np.ndarray] | None = None) -> Volume:
    """The case's volume; with ``field``, its geometry filled with the field (evaluated
    on all voxels at once)."""
    if case in KINDS:
        volume = synthetic(case)
    elif case == "decubitus_left MR":
        volume = synthetic("decubitus_left", modality="MR")
    else:
        volume = real(case)
    if field is None:
        return volume
    return dataclasses.replace(volume, array=field(voxel_points(volume)).reshape(volume.shape))


def voxel_points(volume: Volume) -> np.ndarray:
    """Patient LPS coordinates of every voxel, (n * rows * cols, 3), in (k, i, j) order."""
    n, rows, cols = volume.shape
    i, j = np.mgrid[0:rows, 0:cols]
    plane = (i[..., None] * volume.spacing[1] * volume.col_direction
             + j[..., None] * volume.spacing[2] * volume.row_direction)
    return (slice_origins(volume)[:, None, None, :] + plane[None]).reshape(-1, 3)


# ---------------------------------------------------------------- probe bundles


def make_runtime(tmp: Path, zoo: str, network: Any, network_def: dict[str, Any],
                 names: list[str]) -> MonaiBundleRuntime:
    folder = probe_bundle(shared("monai-model-zoo", zoo), tmp / zoo, network, network_def, names)
    runtime = MonaiBundleRuntime(load_manifest(folder), folder, "cpu")
    runtime.load()
    return runtime


@pytest.fixture(scope="module", params=sorted(THRESHOLDS))
def threshold_runtime(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> MonaiBundleRuntime:
    t = THRESHOLDS[request.param]
    definition = {"_target_": "bundle_probes.ThresholdNet", "thresholds": list(t)}
    return make_runtime(tmp_path_factory.mktemp("thr"), request.param, ThresholdNet(t),
                        definition, ["middle", "high"])


def pixdim(runtime: MonaiBundleRuntime) -> float:
    """The largest target spacing of the bundle's Spacingd (0 without one)."""
    values = [max(np.atleast_1d(t.spacing_transform.pixdim)) for t in runtime._preprocess
              if type(t).__name__ == "Spacingd"]
    return float(max(values, default=0.0))


def intensity(runtime: MonaiBundleRuntime, volume: Volume) -> np.ndarray:
    """The bundle's own intensity transforms (not the spatial ones) on the source grid."""
    from monai.data import MetaTensor
    from monai.transforms import InvertibleTransform

    key = runtime._plan.image_key  # type: ignore[union-attr]
    image = MetaTensor(torch.from_numpy(volume.array.copy())[None])
    data: Any = image if key is None else {key: image}
    for transform in runtime._preprocess:
        if isinstance(transform, InvertibleTransform) or "ChannelFirst" in type(transform).__name__:
            continue
        data = transform(data)
    return np.asarray(data if key is None else data[key])[0]


def interior(classes: list[np.ndarray], volume: Volume, reach_mm: float) -> np.ndarray:
    """Voxels whose neighbourhood is all in one of the boolean ``classes`` masks.

    The neighbourhood: in plane, ``reach_mm`` plus one pixel; along the stack,
    ``reach_mm`` plus two of the largest nearby slice steps (one for the bundle's
    interpolation, one for an uneven stack's regular resampling). Voxels whose
    neighbourhood leaves the volume are not interior.
    """
    origins = slice_origins(volume)
    n = volume.shape[0]
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(origins, axis=0), axis=1))])
    steps = np.diff(t)
    ri, rj = (math.ceil((reach_mm + s) / s) for s in volume.spacing[1:])
    planes = [
        ndimage.minimum_filter(mask.astype(np.uint8), size=(1, 2 * ri + 1, 2 * rj + 1),
                               mode="constant", cval=0).astype(bool)
        for mask in classes
    ]
    out = np.zeros(volume.shape, dtype=bool)
    for k in range(n):
        nearby = steps[max(k - 3, 0) : k + 3]
        reach = reach_mm + 2 * float(nearby.max())
        if t[k] - reach < t[0] - 1e-6 or t[k] + reach > t[-1] + 1e-6:
            continue  # the neighbourhood leaves the volume
        near = np.abs(t - t[k]) <= reach + 1e-6
        for plane in planes:
            out[k] |= np.logical_and.reduce(plane[near], axis=0)
    return out


# ---------------------------------------------------------------- the hand-over itself


@pytest.mark.parametrize("kind", ["axial_hfs", "axial_ffs", "sagittal", "decubitus_left"])
def test_handover_is_what_monai_pydicom_reader_loads(kind: str, tmp_path: Path) -> None:
    """Our MetaTensor, reoriented to RAS, equals MONAI's own PydicomReader's (same
    voxels, same affine): the LPS->RAS convention of MONAI's DICOM readers."""
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    geometry = oriented(kind, (12, 20, 24), (3.0, 2.0, 2.5), centre=(5.0, -7.0, 11.0))
    write_series(tmp_path / kind, geometry, blocks_phantom(), reverse_instances=True)
    volume = load_series(sorted((tmp_path / kind).glob("*.dcm")))
    theirs = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(
        str(tmp_path / kind))
    ours, _ = to_metatensor(volume)
    ours = EnsureChannelFirst()(ours)
    assert ours.meta["space"] == theirs.meta["space"] == "RAS"
    a, b = Orientation("RAS")(ours), Orientation("RAS")(theirs)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_handover_of_the_real_sagittal_mr() -> None:
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    folder = shared("rordenlab-dcm_qa_decubitus", "HFS_t1_fl2d_sag")
    theirs = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(
        str(folder))
    ours, handover = to_metatensor(load_series(dicom_files(folder)))
    a, b = Orientation("RAS")(EnsureChannelFirst()(ours)), Orientation("RAS")(theirs)
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not handover.resampled


def test_uneven_tilted_stack_is_resampled_regularly() -> None:
    """The real tilted head CT (steps 1.08-7 mm) cannot be one affine: it is handed
    over as a regular sheared stack of its finest step; each source slice maps to a
    regular slice at most half a step away, with its own pixels there."""
    volume = real("tilted head CT")
    mt, handover = to_metatensor(volume)
    assert handover.resampled
    origins = slice_origins(volume)
    ras = mt.affine.numpy()
    for k in range(volume.shape[0]):
        m = handover.source_index[k]
        lps = np.diag([-1.0, -1.0, 1.0]) @ (ras[:3, :3] @ [0, 0, m] + ras[:3, 3])
        assert np.linalg.norm(lps - origins[k]) <= 0.55 * 1.09  # half the finest step
    exact = [k for k in range(volume.shape[0])
             if np.allclose(mt[:, :, handover.source_index[k]].numpy().T, volume.array[k])]
    assert exact[0] == 0 and exact[-1] == volume.shape[0] - 1  # the ends land exactly


# ---------------------------------------------------------------- labels on the source grid


def check_threshold_labels(runtime: MonaiBundleRuntime, case: str,
                           thresholds: tuple[float, float]) -> None:
    volume = case_volume(case)
    labels = runtime.predict(volume).labels
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    value = intensity(runtime, volume)
    lo, hi = thresholds
    expected = (value > lo).astype(np.uint8) + (value > hi)
    classes = [value < lo - MARGIN, (value > lo + MARGIN) & (value < hi - MARGIN),
               value > hi + MARGIN]
    inside = interior(classes, volume, pixdim(runtime))
    share = float(inside.mean())
    assert share > 0.15, f"{case}: interior only {share:.1%} of the voxels"
    assert len(np.unique(expected[inside])) >= 2, f"{case}: one class only in the interior"
    wrong = int((labels[inside] != expected[inside]).sum())
    assert wrong == 0, f"{case}: {wrong} of {int(inside.sum())} interior voxels mislabelled"
    assert float((labels == expected).mean()) > 0.85, f"{case}: overall agreement"
    # the check has power: a result mirrored along two of the axes (a head is
    # nearly symmetric left-right) would fail it
    seen = [float((labels[inside] != np.flip(expected, axis)[inside]).mean()) for axis in range(3)]
    assert sorted(seen)[1] > 0.01, f"{case}: mirrored results would pass ({seen})"


@pytest.mark.parametrize("case", CASES)
def test_threshold_labels_land_on_the_source_grid(
    case: str, threshold_runtime: MonaiBundleRuntime
) -> None:
    check_threshold_labels(threshold_runtime, case, THRESHOLDS[threshold_runtime.model_dir.name])


def _without_invertd(config: dict[str, Any]) -> None:
    post = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [t for t in post if t["_target_"] != "Invertd"]


def _array_transforms(config: dict[str, Any]) -> None:
    """The spleen config written with array (not dictionary) transforms."""
    pre = [{k: v for k, v in t.items() if k != "keys"} | {"_target_": t["_target_"][:-1]}
           for t in config["preprocessing"]["transforms"]]
    config["preprocessing"] = {"_target_": "Compose", "transforms": pre}
    config["postprocessing"] = {"_target_": "Compose", "transforms": [
        {"_target_": "Activations", "softmax": True}, {"_target_": "AsDiscrete", "argmax": True}]}


@pytest.mark.parametrize("variant", [_without_invertd, _array_transforms])
@pytest.mark.parametrize("case", ["axial_ffs", "tilted", "sagittal MR"])
def test_the_node_inverts_what_the_bundle_does_not(
    case: str, variant: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    """No Invertd in the postprocessing (or array transforms, which have none): the
    runtime takes the labels back through the preprocessing itself (nearest)."""
    import json

    t = THRESHOLDS["spleen_ct_segmentation"]
    definition = {"_target_": "bundle_probes.ThresholdNet", "thresholds": list(t)}
    folder = probe_bundle(shared("monai-model-zoo", "spleen_ct_segmentation"),
                          tmp_path / "spleen_ct_segmentation", ThresholdNet(t), definition,
                          ["middle", "high"])
    path = Path(str(folder)) / "configs" / "inference.json"
    config = json.loads(path.read_text())
    variant(config)
    path.write_text(json.dumps(config))
    runtime = MonaiBundleRuntime(load_manifest(folder), folder, "cpu")
    runtime.load()
    assert runtime._plan is not None and not runtime._plan.has_invert
    check_threshold_labels(runtime, case, t)


# ---------------------------------------------------------------- the network sees RAS


@pytest.fixture(scope="module")
def axis_runtime(tmp_path_factory: pytest.TempPathFactory) -> MonaiBundleRuntime:
    definition = {"_target_": "bundle_probes.AxisNet", "floor": 1.0, "gain": 400.0}
    return make_runtime(tmp_path_factory.mktemp("axis"), "spleen_ct_segmentation",
                        AxisNet(1.0, 400.0), definition, ["right", "anterior", "superior"])


def ramp(axis: int) -> Callable[[np.ndarray], np.ndarray]:
    """10..150 HU increasing towards the patient's right (0), anterior (1), superior (2)."""
    sign = (-1.0, -1.0, 1.0)[axis]  # RAS from LPS

    def field(p: np.ndarray) -> np.ndarray:
        u = sign * p[:, axis]
        return (10.0 + 140.0 * (u - u.min()) / max(float(np.ptp(u)), 1e-6)).astype(np.float32)

    return field


@pytest.mark.parametrize("case", CASES)
def test_network_sees_ras_axes(case: str, axis_runtime: MonaiBundleRuntime) -> None:
    for axis in range(3):
        volume = case_volume(case, ramp(axis))
        labels = axis_runtime.predict(volume).labels
        inside = interior([np.ones(volume.shape, dtype=bool)], volume, pixdim(axis_runtime))
        assert inside.mean() > 0.1, case
        got = np.bincount(labels[inside], minlength=4)
        assert got.argmax() == axis + 1 and got[axis + 1] == inside.sum(), (
            f"{case}: a ramp towards RAS axis {axis} gave classes {got.tolist()}"
        )


def test_a_wrong_handover_is_caught(axis_runtime: MonaiBundleRuntime,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the DICOM (LPS) affine handed over as if it were RAS, the mistake the
    LPS->RAS conversion exists to avoid, mirrors left-right and front-back: the ramp
    towards the patient's right no longer comes out as class 1."""
    import dicomnode.inference.runtimes.monai_bundle as runtime_module

    right = case_volume("axial_hfs", ramp(0))
    assert float((axis_runtime.predict(right).labels == 1).mean()) > 0.5
    original = runtime_module.to_metatensor

    def lps_called_ras(volume: Volume, **kwargs: Any) -> Any:
        image, handover = original(volume, **{**kwargs, "lps_to_ras": False})
        image.meta["space"] = "RAS"
        return image, handover

    monkeypatch.setattr(runtime_module, "to_metatensor", lps_called_ras)
    assert float((axis_runtime.predict(right).labels == 1).mean()) < 0.05
