"""The MONAI bundle and TorchScript runtimes on the pipeline-test bundle.

``models/monai_test_unet`` is a tiny UNet trained by its ``train.py`` on MONAI's
synthetic spheres (seed 0); here it runs on a synthetic volume from another seed,
larger than its 32^3 patch in every axis and not a multiple of it, so the
sliding-window inferer and its padding are exercised. CPU only, except the CUDA
test, which skips without a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from monai.data.synthetic import create_test_image_3d  # noqa: E402

from dicomnode.core.manifest import Manifest, load_manifest  # noqa: E402
from dicomnode.errors import ConfigError  # noqa: E402
from dicomnode.inference.geometry import Volume  # noqa: E402
from dicomnode.inference.runtime import Prediction  # noqa: E402
from dicomnode.inference.runtimes.monai_bundle import MonaiBundleRuntime  # noqa: E402
from dicomnode.inference.runtimes.torchscript import TorchScriptRuntime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "monai_test_unet"
#: Measured: 0.947-0.985 on 8 held-out 64^3 volumes (train.py), 0.98 on this one.
DICE_THRESHOLD = 0.90
SHAPE = (40, 72, 56)  # (k, i, j): > 32 everywhere, no multiple of 32
SPACING = (2.5, 0.8, 0.8)


def synthetic_volume(
    seed: int = 7, shape: tuple[int, int, int] = SHAPE
) -> tuple[Volume, np.ndarray]:
    """A Volume of synthetic spheres in pseudo-HU (as train.py makes them) and its truth."""
    rs = np.random.RandomState(seed)
    image, seg = create_test_image_3d(
        *shape, num_objs=6, rad_max=12, rad_min=4, noise_max=0.7, num_seg_classes=1, random_state=rs
    )
    hu = (image * 400.0 - 100.0).astype(np.float32)
    n = shape[0]
    volume = Volume(
        array=hu,
        origin=np.array([-100.0, -120.0, 50.0]),
        row_direction=np.array([1.0, 0.0, 0.0]),
        col_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        spacing=SPACING,
        slice_positions=50.0 + np.arange(n) * SPACING[0],
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.1.{k + 1}" for k in range(n)),
        study_uid="1.2.826.0.1.3680043.10.2",
        series_uid="1.2.826.0.1.3680043.10.3",
        frame_of_reference_uid="1.2.826.0.1.3680043.10.4",
        modality="CT",
    )
    return volume, (seg > 0)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    return float(2.0 * (p & t).sum() / max(p.sum() + t.sum(), 1))


def copy_bundle(tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def manifest_with(**changes: object) -> Manifest:
    return Manifest.model_validate({**load_manifest(BUNDLE).model_dump(), **changes})


@pytest.fixture(scope="module")
def case() -> tuple[Volume, np.ndarray]:
    return synthetic_volume()


@pytest.fixture(scope="module")
def bundle_runtime() -> MonaiBundleRuntime:
    runtime = MonaiBundleRuntime(load_manifest(BUNDLE), BUNDLE, "cpu")
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def bundle_prediction(
    bundle_runtime: MonaiBundleRuntime, case: tuple[Volume, np.ndarray]
) -> Prediction:
    return bundle_runtime.predict(case[0])


# ---------------------------------------------------------------- the bundle


def test_bundle_loads_config_parts(bundle_runtime: MonaiBundleRuntime) -> None:
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet

    assert isinstance(bundle_runtime._network, UNet)
    assert not bundle_runtime._network.training
    assert isinstance(bundle_runtime._inferer, SlidingWindowInferer)
    assert tuple(bundle_runtime._inferer.roi_size) == (32, 32, 32)
    # LoadImaged is not run (the node hands the volume over); the others run as configured
    assert [type(t).__name__ for t in bundle_runtime._preprocess] == [
        "EnsureChannelFirstd", "Transposed", "ScaleIntensityRanged", "EnsureTyped"
    ]
    assert bundle_runtime.bundle_version == "0.1.0"


def test_bundle_end_to_end_dice(
    bundle_prediction: Prediction, case: tuple[Volume, np.ndarray]
) -> None:
    volume, truth = case
    labels = bundle_prediction.labels
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert dice(labels == 1, truth) > DICE_THRESHOLD
    assert bundle_prediction.model_name == "monai_test_unet"
    assert bundle_prediction.model_version == "0.1.0"
    assert bundle_prediction.device == "cpu" and bundle_prediction.seconds > 0


def test_bundle_measurements(
    bundle_prediction: Prediction, case: tuple[Volume, np.ndarray]
) -> None:
    volume, truth = case
    voxels = int((bundle_prediction.labels == 1).sum())
    ml, unit = bundle_prediction.measurements["Synthetic mass"]["volume"]
    assert unit == "ml"
    assert ml == pytest.approx(voxels * float(np.prod(SPACING)) / 1000.0)
    assert bundle_prediction.measurements["total"]["volume"][0] == pytest.approx(ml)
    assert ml == pytest.approx(truth.sum() * volume.voxel_volume_ml, rel=0.15)


def test_preprocessing_is_applied(
    bundle_runtime: MonaiBundleRuntime, case: tuple[Volume, np.ndarray]
) -> None:
    """The config's ScaleIntensityRanged maps pseudo-HU to [0, 1]; without it the model fails."""
    x = bundle_runtime._prepare(case[0])
    assert x.shape == (1, 1, *SHAPE)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    unscaled = MonaiBundleRuntime(load_manifest(BUNDLE), BUNDLE, "cpu")
    unscaled.load()
    unscaled._preprocess = [
        t for t in unscaled._preprocess if type(t).__name__ != "ScaleIntensityRanged"
    ]
    assert dice(unscaled.predict(case[0]).labels == 1, case[1]) < 0.5


def test_predict_before_load_is_an_error(case: tuple[Volume, np.ndarray]) -> None:
    runtime = MonaiBundleRuntime(load_manifest(BUNDLE), BUNDLE, "cpu")
    with pytest.raises(RuntimeError, match="before load"):
        runtime.predict(case[0])


# ---------------------------------------------------------------- malformed bundles


def test_missing_inference_config(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    (folder / "configs" / "inference.json").unlink()
    with pytest.raises(ConfigError, match="inference.json.*missing"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_missing_weights(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="model.pt.*missing"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_unparseable_config(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    (folder / "configs" / "inference.json").write_text('{"network_def": {', encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    config = folder / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"out_channels": 2', '"out_channels": 3'))
    with pytest.raises(ConfigError, match="does not fit network_def"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_unknown_network_target(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    config = folder / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"_target_": "UNet"', '"_target_": "NoSuchNet"'))
    with pytest.raises(ConfigError, match="network_def.*cannot instantiate"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_corrupt_weights(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    (folder / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable state dict"):
        MonaiBundleRuntime(load_manifest(folder), folder, "cpu").load()


def test_label_without_channel(tmp_path: Path) -> None:
    extra = {
        "value": 2,
        "name": "Other",
        "category": {"value": "49755003", "meaning": "Morphologically Altered Structure"},
        "type": {"value": "4147007", "meaning": "Mass"},
    }
    manifest = manifest_with(labels=[*load_manifest(BUNDLE).model_dump()["labels"], extra])
    with pytest.raises(ConfigError, match=r"\[2\] have no output channel"):
        MonaiBundleRuntime(manifest, BUNDLE, "cpu").load()


def test_weights_outside_folder(tmp_path: Path) -> None:
    manifest = manifest_with(weights="../monai_test_unet/models/model.pt")
    folder = copy_bundle(tmp_path)
    with pytest.raises(ConfigError, match="outside the model folder"):
        MonaiBundleRuntime(manifest, folder, "cpu").load()


# ---------------------------------------------------------------- TorchScript


@pytest.fixture(scope="module")
def scripted(bundle_runtime: MonaiBundleRuntime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's network exported to TorchScript in a temporary model folder."""
    folder = tmp_path_factory.mktemp("ts_model")
    torch.jit.script(bundle_runtime._network).save(str(folder / "model.ts"))
    return folder


def test_torchscript_agrees_with_bundle(
    scripted: Path, bundle_prediction: Prediction, case: tuple[Volume, np.ndarray]
) -> None:
    manifest = manifest_with(
        runtime="torchscript",
        weights="model.ts",
        patch_size=(32, 32, 32),
        intensity_window=(-100.0, 300.0),
    )
    runtime = TorchScriptRuntime(manifest, scripted, "cpu")
    runtime.load()
    prediction = runtime.predict(case[0])
    assert prediction.labels.shape == case[0].shape and prediction.labels.dtype == np.uint8
    assert (prediction.labels == bundle_prediction.labels).mean() > 0.999
    assert dice(prediction.labels == 1, case[1]) > DICE_THRESHOLD
    got = prediction.measurements["Synthetic mass"]["volume"][0]
    assert got == pytest.approx(
        bundle_prediction.measurements["Synthetic mass"]["volume"][0], rel=0.01
    )


def test_bundle_with_torchscript_weights(
    scripted: Path, tmp_path: Path, bundle_prediction: Prediction, case: tuple[Volume, np.ndarray]
) -> None:
    """A bundle shipping models/model.ts instead of model.pt runs the same."""
    folder = copy_bundle(tmp_path)
    (folder / "models" / "model.pt").unlink()
    shutil.copy(scripted / "model.ts", folder / "models" / "model.ts")
    runtime = MonaiBundleRuntime(load_manifest(folder), folder, "cpu")
    runtime.load()
    assert (runtime.predict(case[0]).labels == bundle_prediction.labels).mean() > 0.999


def test_torchscript_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weights.*required"):
        TorchScriptRuntime(manifest_with(runtime="torchscript"), tmp_path, "cpu").load()
    with pytest.raises(ConfigError, match="file not found"):
        TorchScriptRuntime(
            manifest_with(runtime="torchscript", weights="model.ts"), tmp_path, "cpu"
        ).load()
    (tmp_path / "model.ts").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a TorchScript file"):
        TorchScriptRuntime(
            manifest_with(runtime="torchscript", weights="model.ts"), tmp_path, "cpu"
        ).load()


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_bundle_on_cuda(bundle_prediction: Prediction, case: tuple[Volume, np.ndarray]) -> None:
    runtime = MonaiBundleRuntime(load_manifest(BUNDLE), BUNDLE, "cuda")
    runtime.load()
    assert next(runtime._network.parameters()).is_cuda
    first = runtime.predict(case[0])
    second = runtime.predict(case[0])  # warm: same network, still on the GPU
    assert first.device == "cuda"
    assert (first.labels == bundle_prediction.labels).mean() > 0.995  # float16 autocast
    assert np.array_equal(first.labels, second.labels)
    assert dice(first.labels == 1, case[1]) > DICE_THRESHOLD


def test_cuda_unavailable_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA not available"):
        MonaiBundleRuntime(load_manifest(BUNDLE), BUNDLE, "cuda").load()


def test_metadata_is_optional(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    (folder / "configs" / "metadata.json").unlink()
    runtime = MonaiBundleRuntime(load_manifest(folder), folder, "cpu")
    runtime.load()
    assert runtime.bundle_version is None and runtime._lut is None  # channel c -> label c


def test_load_model_picks_the_bundle_runtime() -> None:
    from dicomnode.inference.runtimes import load_model

    runtime = load_model(BUNDLE, "cpu")
    assert isinstance(runtime, MonaiBundleRuntime) and runtime._network is not None
