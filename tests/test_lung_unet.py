"""models/lung_unet: the trained MONAI bundle that ships (NOT a clinical model).

* the bundle (zoo layout, weights under 20 MB, same labels and codes as lung_density);
* on the half of the shared chest CT it was not trained on, it agrees with
  models/lung_density (Dice >= 0.95 per lung), run as its own series;
* right/left come from the patient geometry (the bundle's Orientationd), not from
  where the lung is in the image: a synthetic chest it has not seen, written
  head-first and decubitus (rotated 90 degrees in plane), gets the same labels;
* a routing rule sends a chest CT to it through a real node; its SEG names it as the
  algorithm; a broken bundle next to it is refused at start-up and the node runs on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("nibabel")

from conftest import ROOT, dicom_files, shared, storescu  # noqa: E402
from test_lung_model import _import_model  # noqa: E402

from dicomnode.core.manifest import load_manifest  # noqa: E402
from dicomnode.inference.bundle_geometry import sub_volume  # noqa: E402
from dicomnode.inference.geometry import Volume  # noqa: E402
from dicomnode.inference.runtimes import load_model  # noqa: E402
from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic_oriented import chest_phantom, oriented, sample, to_volume  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BUNDLE = ROOT / "models" / "lung_unet"
TEACHER = ROOT / "models" / "lung_density"
DICE_MIN = 0.95
HELD_OUT = slice(0, 32)  # the inferior half of the shared chest CT; train.py trains on 32-63


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1))


@pytest.fixture(scope="module")
def unet() -> Any:
    return load_model(BUNDLE, "cpu")


@pytest.fixture(scope="module")
def teacher() -> Any:
    model = _import_model().LungDensityModel(load_manifest(TEACHER), TEACHER, "cpu")
    model.load()
    return model


@pytest.fixture(scope="module")
def chest(teacher: Any) -> tuple[Volume, np.ndarray]:
    folder = shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB")
    volume = load_series(dicom_files(folder))
    return volume, teacher.predict(volume).labels


def test_bundle_layout() -> None:
    for part in ("configs/inference.json", "configs/metadata.json", "models/model.pt",
                 "manifest.yaml", "README.md", "train.py"):
        assert (BUNDLE / part).is_file(), part
    assert (BUNDLE / "models" / "model.pt").stat().st_size <= 20 * 1024 * 1024
    assert "NOT a clinical model" in (BUNDLE / "README.md").read_text()
    ours, theirs = load_manifest(BUNDLE), load_manifest(TEACHER)
    assert ours.runtime == "monai_bundle" and ours.mixed_precision
    assert [(a.value, a.name, a.category, a.type) for a in ours.labels] == [
        (b.value, b.name, b.category, b.type) for b in theirs.labels]
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] == ours.version


def test_runs_its_own_processing(unet: Any) -> None:
    plan = unet._plan
    assert [type(t).__name__ for t in plan.preprocess] == [
        "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged",
        "AddCoordinateChannelsd", "EnsureTyped"]
    assert [type(t).__name__ for t in plan.postprocess] == ["Activationsd", "Invertd", "AsDiscreted"]
    assert plan.dropped == ["SaveImaged"]
    assert type(unet._inferer).__name__ == "SlidingWindowInferer"
    assert unet._amp  # autocast on CUDA; the same code path without it on the CPU


def test_agrees_with_lung_density_on_held_out_chest_ct(
    unet: Any, chest: tuple[Volume, np.ndarray]
) -> None:
    volume, reference = chest
    held_out = sub_volume(volume, HELD_OUT)
    labels = unet.predict(held_out).labels
    assert labels.shape == held_out.shape and labels.dtype == np.uint8
    ref = reference[HELD_OUT]
    right, left = dice(labels == 1, ref == 1), dice(labels == 2, ref == 2)
    assert right >= DICE_MIN and left >= DICE_MIN, f"Dice right {right:.3f}, left {left:.3f}"


def test_right_and_left_follow_the_patient(unet: Any, teacher: Any) -> None:
    """A chest it never saw (seed 777), head-first and decubitus: the same lungs."""
    results = {}
    for kind in ("axial_hfs", "decubitus_left"):
        rng = np.random.default_rng(777)
        geometry = oriented(kind, (48, 120, 120), (5.0, 3.2, 3.2))
        values = sample(geometry, chest_phantom(rng))
        values += np.random.default_rng(1).normal(0, 20, values.shape).astype(np.float32)
        volume = to_volume(geometry, values)
        labels = unet.predict(volume).labels
        reference = teacher.predict(volume).labels
        for value in (1, 2):
            assert dice(labels == value, reference == value) > 0.9, (kind, value)
        points = {v: volume.index_to_patient(np.argwhere(labels == v)).mean(axis=0)
                  for v in (1, 2)}
        assert points[1][0] < points[2][0], kind  # LPS: the right lung has the smaller x
        results[kind] = points
    assert np.allclose(results["axial_hfs"][1], results["decubitus_left"][1], atol=3.0)


def test_routed_to_lung_unet_through_the_node(node_factory: Any, reference_scp: Any,
                                              tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(BUNDLE, models / "lung_unet", ignore=shutil.ignore_patterns("__pycache__"))
    broken = models / "broken_bundle"
    shutil.copytree(ROOT / "models" / "monai_test_unet", broken,
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = json.loads((broken / "configs" / "inference.json").read_text())
    config["inferer"] = {"_target_": "scripts.inferer.Custom"}
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    manifest = yaml.safe_load((broken / "manifest.yaml").read_text())
    (broken / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "name": "broken_bundle"}))
    settings = {
        "models_dir": str(models),
        "completion": {"quiet_seconds": 1.0},
        "destinations": [{"name": "pacs", "ae_title": "REFSCP", "host": "127.0.0.1",
                          "port": reference_scp.port, "objects": ["seg"]}],
        "routing": [
            {"name": "chest-ct-lung-unet", "model": "lung_unet", "destinations": ["pacs"],
             "match": {"modality": ["CT"], "orientation": "axial",
                       "study_description": "(?i)chest", "instances": {"min": 20}}},
            {"name": "mr-broken", "model": "broken_bundle", "match": {"modality": ["MR"]}},
        ],
    }
    node = node_factory(settings).start(timeout=180)
    assert "broken_bundle" in node.log() and "scripts.inferer.Custom" in node.log()
    chest_files = dicom_files(shared("tcia-lung-pet-ct-dx"))
    assert storescu(node.port, chest_files).returncode == 0

    def seg() -> Path | None:
        for path in reference_scp.outdir.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.Modality == "SEG":
                return path
        return None

    path = node.wait_for(seg, timeout=300, interval=1.0)
    jobs = node.status()["jobs"]
    assert [(j["model"], j["state"]) for j in jobs] == [("lung_unet", "done")], jobs
    ds = pydicom.dcmread(path)
    names = [(s.SegmentLabel, s.SegmentAlgorithmName, s.SegmentAlgorithmType)
             for s in ds.SegmentSequence]
    assert names == [("right lung", "lung_unet", "AUTOMATIC"),
                     ("left lung", "lung_unet", "AUTOMATIC")]
    assert "lung_unet" in [e.ManufacturerModelName for e in ds.ContributingEquipmentSequence]
