"""The synthetic chest phantom (dicomnode.phantom) and ``dicomnode demo``.

The phantom is what a newcomer without data sends first, so the lung model must treat
it like a chest: two lungs of plausible size on the right sides, airway and mediastinum
left out, densities in the range of a real scan. ``dicomnode demo`` sends it to a real
node, which routes it to the lung model and produces its SEG and SR.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from conftest import ROOT, index_query, run_cli

from dicomnode.inference.volume import load_series
from dicomnode.phantom import ChestPhantom, make_chest_phantom


@pytest.fixture(scope="module")
def phantom_prediction(tmp_path_factory: Any) -> Any:
    from dicomnode.inference.runtimes import load_model

    paths = make_chest_phantom(tmp_path_factory.mktemp("phantom"))
    volume = load_series(paths)
    model = load_model(ROOT / "models" / "lung_density", "cpu")
    model.load()
    return paths, volume, model.predict(volume)


def test_the_lung_model_finds_two_plausible_lungs(phantom_prediction: Any) -> None:
    paths, volume, p = phantom_prediction
    assert len(paths) == 120 and volume.shape == (120, 256, 256)
    right, left, total = (p.measurements[k] for k in ("right lung", "left lung", "total"))
    assert 2300 < right["volume"][0] < 3300 and 2000 < left["volume"][0] < 3000
    assert right["volume"][0] > left["volume"][0]  # the heart takes room on the left
    assert -870 < total["mean density"][0] < -800
    assert 0.05 < total["LAA%-950"][0] < 5  # the emphysema-like patches
    assert -920 < total["PD15"][0] < -860
    # right and left are the patient's: the right lung lies at patient x < 0 (LPS)
    for value, sign in ((1, -1), (2, 1)):
        kij = np.argwhere(p.labels == value).mean(axis=0)
        assert sign * volume.index_to_patient(kij[None])[0, 0] > 40
    # airway and mediastinum are not lung: trachea lumen above the carina, heart centre
    phantom = ChestPhantom()

    def label_at(x: float, y: float, z: float) -> int:
        k = int(np.argmin(np.abs(volume.slice_positions - z)))
        j = int(round((x - volume.origin[0]) / volume.spacing[2]))
        i = int(round((y - volume.origin[1]) / volume.spacing[1]))
        return int(p.labels[k, i, j])

    assert label_at(0.0, 2.0, 80.0) == 0  # trachea (phantom._trachea: r = 9 mm)
    assert label_at(20.0, -18.0, -45.0) == 0  # heart centre
    assert label_at(-80.0, 8.0, 40.0) == 1 and label_at(80.0, 8.0, 40.0) == 2
    assert phantom.slice_hu(80.0, 0)[128, 128] < -900  # the lumen is air indeed


def test_the_phantom_is_deterministic_and_checks_its_arguments(tmp_path: Path) -> None:
    a = ChestPhantom(rows=96, cols=96, seed=1).slice_hu(10.0, 5)
    b = ChestPhantom(rows=96, cols=96, seed=1).slice_hu(10.0, 5)
    c = ChestPhantom(rows=96, cols=96, seed=2).slice_hu(10.0, 5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="at least 20"):
        make_chest_phantom(tmp_path, n_slices=10)
    with pytest.raises(ValueError, match="at least 64"):
        ChestPhantom(rows=32, cols=32)
    paths = make_chest_phantom(tmp_path / "small", n_slices=20, rows=64, cols=64)
    ds = pydicom.dcmread(paths[0])
    assert ds.PatientName == "PHANTOM^CHEST" and ds.BodyPartExamined == "CHEST"
    assert ds.Modality == "CT" and ds.pixel_array.shape == (64, 64)


def test_demo_sends_the_phantom_and_the_node_returns_seg_and_sr(node_factory: Any) -> None:
    """The README's first result: a node on its embedded defaults (no routing, no
    destination in its config) and `dicomnode demo`: the phantom routes to lung_density
    and its SEG and SR are kept in the node."""
    node = node_factory({"models_dir": str(ROOT / "models")})
    settings = dict(node.settings)
    del settings["routing"]  # the embedded default rule applies
    node.config_path.write_text(yaml.safe_dump(settings))
    node.start(timeout=120)
    run = run_cli("demo", "--config", str(node.config_path), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "sent 120 of 120 instances" in run.stdout
    study = re.search(r"of study ([0-9.]+)", run.stdout).group(1)  # type: ignore[union-attr]
    assert f"http://127.0.0.1:{node.http_port}/" in run.stdout
    assert f"/viewer/viewer?StudyInstanceUIDs={study}" in run.stdout

    def results() -> list[tuple[Any, ...]]:
        return index_query(node.storage, "SELECT sop_class_uid, path FROM instances "
                           "WHERE origin = 'result' AND study_uid = ?", (study,))
    node.wait_for(lambda: len(results()) >= 2, timeout=240)
    found = results()
    sr_path = next(node.storage / p for c, p in found if c.endswith(".88.34"))
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr_path)], copy=True)
    volumes = {g.tracking_identifier: g.get_measurements()[0].value
               for g in report.get_volumetric_roi_measurement_groups()}
    assert set(volumes) == {"right lung", "left lung"}
    assert all(2000 < v < 3300 for v in volumes.values()), volumes


def test_demo_says_when_nothing_listens(tmp_path: Path) -> None:
    from conftest import free_port

    run = run_cli("demo", "--to", f"NOBODY@127.0.0.1:{free_port()}", timeout=120)
    assert run.returncode != 0
    assert "failed" in (run.stdout + run.stderr).lower()
