"""The ModelRuntime contract, over every runtime the node has: builtin (Python in the model
folder: models/lung_density), monai_bundle (models/monai_test_unet) and torchscript (the
same network scripted). Each is loaded once by the pool and stays warm; predict() before
load() refuses; labels are uint8 on the volume's (slice, row, column) grid and hold only
0 and the manifest's label values; a model that breaks the contract is refused with a
clear error, never passed on to the encoders."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import ROOT

from dicomnode.core.manifest import load_manifest
from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtime import (
    InvalidPredictionError,
    ModelNotLoadedError,
    ModelRuntime,
    Prediction,
)
from dicomnode.inference.runtimes import load_model, runtime_class
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series
from dicomnode.worker.pool import ModelPool

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the three runtimes: the two shipped models and a TorchScript
    copy of the bundle's network."""
    import torch

    root = tmp_path_factory.mktemp("models")
    for name in ("lung_density", "monai_test_unet"):
        shutil.copytree(MODELS / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    bundle = load_model(root / "monai_test_unet", "cpu")
    scripted = root / "scripted_unet"
    scripted.mkdir()
    torch.jit.script(bundle._network).save(str(scripted / "model.ts"))  # type: ignore[attr-defined]
    manifest = yaml.safe_load((root / "monai_test_unet" / "manifest.yaml").read_text())
    manifest.update(name="scripted_unet", runtime="torchscript", weights="model.ts",
                    patch_size=[32, 32, 32], intensity_window=[-100.0, 300.0])
    (scripted / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """A small synthetic chest phantom (what the lung model expects; the others take any
    volume)."""
    return load_series(make_ct_series(tmp_path_factory.mktemp("ct"), 24, 96, 96))


RUNTIMES = ["lung_density", "monai_test_unet", "scripted_unet"]


@pytest.mark.parametrize("name", RUNTIMES)
def test_predict_before_load_refuses(models: Path, volume: Volume, name: str) -> None:
    manifest = load_manifest(models / name)
    runtime = runtime_class(manifest, models / name)(manifest, models / name, "cpu")
    assert not runtime.loaded
    with pytest.raises(ModelNotLoadedError, match="before load"):
        runtime.predict(volume)


@pytest.mark.parametrize("name", RUNTIMES)
def test_loaded_once_and_labels_on_the_volume_grid(models: Path, volume: Volume,
                                                   name: str) -> None:
    pool = ModelPool(models, "cpu")
    runtime = pool.get(name)
    assert runtime.loaded and pool.get(name) is runtime  # one load, kept warm
    manifest = runtime.manifest
    prediction = runtime.predict(volume)
    labels = prediction.labels
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    assert set(np.unique(labels).tolist()) <= {0} | {lab.value for lab in manifest.labels}
    assert prediction.model_name == manifest.name
    assert prediction.model_version == manifest.version
    assert prediction.device == "cpu" and prediction.seconds >= 0


def test_the_lung_model_finds_both_lungs_on_the_phantom(models: Path, volume: Volume) -> None:
    labels = ModelPool(models, "cpu").get("lung_density").predict(volume).labels
    assert (labels == 1).sum() > 1000 and (labels == 2).sum() > 1000


class _Rogue(ModelRuntime):
    """A model folder's own runtime that breaks the contract in the way ``mode`` says."""

    mode = "ok"

    def load(self) -> None:
        pass

    def predict(self, volume: Volume) -> Prediction:
        n, i, j = volume.shape
        labels: Any = np.zeros((n, i, j), dtype=np.uint8)
        if self.mode == "dtype":
            labels = labels.astype(np.int64)
        elif self.mode == "shape":
            labels = np.zeros((n, j, i), dtype=np.uint8)  # transposed in-plane
        elif self.mode == "value":
            labels[0, 0, 0] = 7
        return Prediction(labels, {}, self.manifest.name, self.manifest.version)


@pytest.mark.parametrize(("mode", "why"), [("dtype", "int64, not uint8"),
                                           ("shape", "shape"),
                                           ("value", r"\[7\] are not in its manifest")])
def test_a_prediction_that_breaks_the_contract_is_refused(models: Path, volume: Volume,
                                                          mode: str, why: str) -> None:
    if volume.shape[1] == volume.shape[2] and mode == "shape":
        volume = dataclasses.replace(volume, array=volume.array[:, :, :-8])
    manifest = load_manifest(models / "lung_density")
    rogue = _Rogue(manifest, models / "lung_density", "cpu")
    rogue.mode = mode
    rogue.load()
    with pytest.raises(InvalidPredictionError, match=why):
        rogue.predict(volume)
    rogue.mode = "ok"
    assert rogue.predict(volume).labels.shape == volume.shape


def test_stray_label_values_one_rule_for_every_check(models: Path) -> None:
    """The one rule the runtime contract, the worker hand-back and the encoders use."""
    manifest = load_manifest(models / "lung_density")  # labels 1 and 2
    assert sorted(lab.value for lab in manifest.labels) == [1, 2]
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    assert manifest.stray_label_values(labels) == []
    labels[0, 0, 0], labels[1, 1, 1] = 1, 2
    assert manifest.stray_label_values(labels) == []
    labels[2, 2, 2], labels[3, 3, 3] = 7, 255
    assert manifest.stray_label_values(labels) == [7, 255]
    assert manifest.stray_label_values(labels.astype(np.int64) - 1) == [-1, 6, 254]
    assert manifest.stray_label_values(np.zeros((0, 8, 8), dtype=np.uint8)) == []
    gaps = manifest.model_copy(update={"labels": (manifest.labels[1],)})  # only label 2
    labels[2, 2, 2] = labels[3, 3, 3] = 0
    assert gaps.stray_label_values(labels) == [1]
