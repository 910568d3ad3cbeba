"""The real MONAI model-zoo configs through the monai_bundle runtime (shared data).

No zoo weights exist here (nothing may download them): the networks are the configs'
own, instantiated with weights made from a fixed seed. The spleen bundle is checked
against MONAI running the very same config on the same DICOM series (its own
LoadImaged with MONAI's PydicomReader): the node's labels must be MONAI's. Then
what the node refuses at load, with the model's folder and the reason, and the
autocast switch (the CUDA test skips without a GPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("nibabel")

from bundle_probes import manifest_for  # noqa: E402
from conftest import ROOT, shared  # noqa: E402

from dicomnode.core.manifest import load_manifest  # noqa: E402
from dicomnode.errors import ConfigError  # noqa: E402
from dicomnode.inference.bundle_geometry import to_metatensor  # noqa: E402
from dicomnode.inference.runtimes.monai_bundle import MonaiBundleRuntime  # noqa: E402
from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic_oriented import blocks_phantom, oriented, write_series  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def zoo(name: str) -> Path:
    return shared("monai-model-zoo", name)


def bundle_with_weights(name: str, dest: Path, labels: list[str], seed: int = 0,
                        edit: Any = None, weights: bool = True) -> Path:
    """The zoo bundle's configs in ``dest`` with seeded weights for its own network
    (``weights=False``: a placeholder file, for bundles refused before weights load)."""
    from monai.bundle import ConfigParser

    shutil.copytree(zoo(name) / "configs", dest / "configs")
    if edit is not None:
        path = dest / "configs" / "inference.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config, indent=1))
    parser = ConfigParser()
    parser.read_config(dest / "configs" / "inference.json")
    (dest / "models").mkdir()
    if weights:
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
        torch.save(network.state_dict(), dest / "models" / "model.pt")
    else:
        (dest / "models" / "model.pt").write_bytes(b"")
    meta = json.loads((dest / "configs" / "metadata.json").read_text())
    (dest / "manifest.yaml").write_text(
        yaml.safe_dump(manifest_for(labels, version=str(meta["version"]))))
    return dest


def load(folder: Path, device: str = "cpu") -> MonaiBundleRuntime:
    runtime = MonaiBundleRuntime(load_manifest(folder), folder, device)
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic CT series on disk (feet-first, so not in MONAI's order)."""
    folder = tmp_path_factory.mktemp("ct")
    geometry = oriented("axial_ffs", (20, 48, 40), (3.0, 2.2, 2.4), centre=(4.0, -6.0, 3.0))
    write_series(folder, geometry, blocks_phantom(), noise=20.0, seed=1)
    return folder


# ---------------------------------------------------------------- the zoo's networks


def test_zoo_networks_instantiate() -> None:
    from monai.bundle import ConfigParser

    expected = {"spleen_ct_segmentation": ("UNet", 4.8e6),
                "wholeBody_ct_segmentation": ("SegResNet", 1.88e7)}
    for name, (cls, about) in expected.items():
        parser = ConfigParser()
        parser.read_config(zoo(name) / "configs" / "inference.json")
        network = parser.get_parsed_content("network_def")
        params = sum(p.numel() for p in network.parameters())
        assert type(network).__name__ == cls
        assert 0.8 * about < params < 1.25 * about, (name, params)


def test_spleen_bundle_runs_as_monai_runs_it(ct_series: Path, tmp_path: Path) -> None:
    """The zoo's spleen config unchanged, its own UNet: the node's labels (on the source
    grid) are exactly what MONAI's own pipeline (LoadImaged with PydicomReader, the
    same preprocessing, inferer and postprocessing with Invertd) makes of the series."""
    from monai.bundle import ConfigParser
    from monai.transforms import Orientation

    folder = bundle_with_weights("spleen_ct_segmentation", tmp_path / "spleen", ["spleen"])
    runtime = load(folder)
    plan = runtime._plan
    assert plan is not None
    assert [type(t).__name__ for t in plan.preprocess] == [
        "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert [type(t).__name__ for t in plan.postprocess] == [
        "Activationsd", "Invertd", "AsDiscreted"]
    assert plan.dropped == ["SaveImaged"] and plan.image_key == "image"
    volume = load_series(sorted(ct_series.glob("*.dcm")))
    ours = runtime.predict(volume).labels
    assert ours.shape == volume.shape and ours.dtype == np.uint8
    assert 0.001 < float((ours == 1).mean()) < 0.999  # random weights, but not constant

    parser = ConfigParser()
    parser.read_config(folder / "configs" / "inference.json")
    parser["preprocessing#transforms#0#reader"] = "PydicomReader"
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    post.transforms = [t for t in post.transforms if type(t).__name__ != "SaveImaged"]
    network = runtime._network
    with torch.no_grad():
        data = pre({"image": str(ct_series)})
        logits = runtime._inferer(data["image"][None], network)
        out = post({"image": data["image"], "pred": logits[0]})["pred"]
    theirs = Orientation("RAS")(out)
    label_volume = volume.__class__(**{**volume.__dict__, "array": ours.astype(np.float32)})
    mine, _ = to_metatensor(label_volume, channel_first=True)
    mine = Orientation("RAS")(mine)
    np.testing.assert_allclose(mine.affine.numpy(), theirs.affine.numpy(), atol=1e-3)
    agreement = float((mine.numpy() == theirs.numpy()).mean())
    assert agreement > 0.999, agreement


def test_whole_body_bundle_runs_with_its_segresnet(ct_series: Path, tmp_path: Path) -> None:
    """105 output channels named in metadata.json; the manifest names three of them
    (by channel name, in its own order); the others become background."""
    folder = bundle_with_weights(
        "wholeBody_ct_segmentation", tmp_path / "wb", ["liver", "spleen", "aorta"],
        edit=lambda c: c["displayable_configs"].update(highres=False))  # 3 mm: faster
    runtime = load(folder)
    assert runtime._lut is not None and len(runtime._lut) == 105
    assert (runtime._lut[5], runtime._lut[1], runtime._lut[7]) == (1, 2, 3)
    assert int(np.count_nonzero(runtime._lut)) == 3
    volume = load_series(sorted(ct_series.glob("*.dcm")))
    prediction = runtime.predict(volume)
    assert prediction.labels.shape == volume.shape and prediction.labels.dtype == np.uint8
    assert set(np.unique(prediction.labels)) <= {0, 1, 2, 3}
    assert set(prediction.measurements) == {"liver", "spleen", "aorta", "total"}


def test_detection_network_instantiates() -> None:
    """RetinaNet's feature pyramid needs torchvision, which dicomnode does not install."""
    pytest.importorskip("torchvision")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(zoo("lung_nodule_ct_detection") / "configs" / "inference.json")
    assert type(parser.get_parsed_content("network_def")).__name__ == "RetinaNet"


def test_detection_bundle_is_refused_with_its_reason(tmp_path: Path) -> None:
    """lung_nodule_ct_detection outputs boxes: refused at load (the node makes SEGs)."""
    folder = bundle_with_weights("lung_nodule_ct_detection", tmp_path / "nodule", ["nodule"],
                                 weights=False)
    with pytest.raises(ConfigError) as info:
        load(folder)
    text = str(info.value)
    assert str(folder) in text and "network_data_format.outputs.pred" in text
    assert "'object'" in text and "label map" in text


# ---------------------------------------------------------------- refused at load


def _spleen_edit(tmp_path: Path, edit: Any, meta: Any = None) -> Path:
    folder = bundle_with_weights("spleen_ct_segmentation", tmp_path / "b", ["spleen"], edit=edit)
    if meta is not None:
        path = folder / "configs" / "metadata.json"
        data = json.loads(path.read_text())
        meta(data)
        path.write_text(json.dumps(data))
    return folder


def _transforms(config: dict[str, Any], part: str = "preprocessing") -> list[Any]:
    return config[part]["transforms"]  # type: ignore[no-any-return]


REFUSALS: dict[str, tuple[Any, Any, str]] = {
    "a label loaded with the image": (
        lambda c: _transforms(c)[0].update(keys=["image", "label"]), None,
        r"loads a second image \(image, label\)"),
    "a second modality": (
        lambda c: _transforms(c).insert(1, {"_target_": "LoadImaged", "keys": "t2"}), None,
        r"loads a second image \(t2\)"),
    "a transform reading a key the node lacks": (
        lambda c: _transforms(c).insert(2, {"_target_": "CropForegroundd", "keys": "image",
                                             "source_key": "label"}), None,
        r"CropForegroundd needs key\(s\) \['label'\]"),
    "a reader that cannot read DICOM series": (
        lambda c: _transforms(c)[0].update(reader="NumpyReader"), None,
        "reader 'NumpyReader' does not read DICOM series"),
    "an array LoadImage besides LoadImaged": (
        lambda c: _transforms(c).insert(1, {"_target_": "LoadImage"}), None,
        "loads a second image"),
    "postprocessing that needs the label": (
        lambda c: _transforms(c, "postprocessing").insert(
            0, {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": True}), None,
        r"AsDiscreted needs key\(s\) \['label'\]"),
    "a 2-D network": (
        lambda c: c["network_def"].update(spatial_dims=2), None,
        "a 2-D network"),
    "two input channels": (
        lambda c: c["network_def"].update(in_channels=2), None,
        "the network takes 2 input channels; the preprocessing makes 1"),
    "two inputs": (
        None, lambda m: m["network_data_format"]["inputs"].update(t2={"type": "image"}),
        r"needs 2 inputs \(image, t2\)"),
    "the bundle's own scripts as inferer": (
        lambda c: c.update(inferer={"_target_": "scripts.infer.Inferer"}), None,
        r"scripts\.infer\.Inferer is the bundle's own code"),
    "a transform that fails on the node's volume": (
        lambda c: _transforms(c).insert(3, {"_target_": "SpatialCropd", "keys": "image",
                                             "roi_start": [500, 500, 500],
                                             "roi_end": [400, 400, 400]}), None,
        "does not run on a volume the node hands over"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_at_load_with_the_reason(case: str, tmp_path: Path) -> None:
    edit, meta, reason = REFUSALS[case]
    folder = _spleen_edit(tmp_path, edit, meta)
    with pytest.raises(ConfigError, match=reason) as info:
        load(folder)
    assert str(folder) in str(info.value)


def test_the_node_keeps_its_other_models(tmp_path: Path) -> None:
    """One bundle refused: the model pool still loads the others (the node starts with
    them, see service._preload and tests/test_lung_unet.py)."""
    from dicomnode.worker.pool import ModelPool

    models = tmp_path / "models"
    _spleen_edit(models, lambda c: c.update(inferer={"_target_": "scripts.x.Y"}))
    (models / "b").rename(models / "broken")
    shutil.copytree(ROOT / "models" / "monai_test_unet", models / "good",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pool = ModelPool(models, "cpu")
    with pytest.raises(ConfigError, match="(?s)broken.*scripts.x.Y"):
        pool.get("broken")
    assert pool.get("good").manifest.name == "monai_test_unet"


# ---------------------------------------------------------------- autocast


def test_amp_follows_manifest_and_bundle(tmp_path: Path) -> None:
    folder = bundle_with_weights("wholeBody_ct_segmentation", tmp_path / "wb", ["liver"],
                                 edit=lambda c: c["evaluator"].update(amp=False))
    assert load(folder)._amp is False  # the bundle's evaluator says amp false
    spleen = bundle_with_weights("spleen_ct_segmentation", tmp_path / "sp", ["spleen"])
    assert load(spleen)._amp is True
    manifest = yaml.safe_load((spleen / "manifest.yaml").read_text())
    (spleen / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "mixed_precision": False}))
    assert load(spleen)._amp is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_spleen_on_cuda_with_and_without_amp(ct_series: Path, tmp_path: Path) -> None:
    folder = bundle_with_weights("spleen_ct_segmentation", tmp_path / "spleen", ["spleen"])
    volume = load_series(sorted(ct_series.glob("*.dcm")))
    cpu = load(folder).predict(volume).labels
    gpu = load(folder, "cuda")
    assert gpu._amp and next(gpu._network.parameters()).is_cuda
    amp = gpu.predict(volume)
    assert amp.device == "cuda" and float((amp.labels == cpu).mean()) > 0.99
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    (folder / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "mixed_precision": False}))
    full = load(folder, "cuda")
    assert not full._amp
    assert float((full.predict(volume).labels == cpu).mean()) > 0.999
