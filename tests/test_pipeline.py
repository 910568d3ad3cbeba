"""A completed study goes through the rules to the queue and the model, for real.

The node runs as a subprocess with the real models/ folder; DCMTK storescu sends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, NodeProcess, dicom_files, shared, storescu

LUNG_RULES: dict[str, Any] = {
    "models_dir": str(ROOT / "models"),
    "routing": [
        {
            "name": "chest-ct-lung-density",
            "model": "lung_density",
            "match": {
                "modality": ["CT"],
                "body_part": "chest|lung|thorax",
                "orientation": "axial",
                "slice_thickness": {"max": 6},
                "instances": {"min": 20},
            },
        }
    ],
    "completion": {"quiet_seconds": 1.0},
}


def _jobs(node: NodeProcess) -> list[dict[str, Any]]:
    return list(node.status()["jobs"])


def _done(node: NodeProcess) -> list[dict[str, Any]] | None:
    jobs = _jobs(node)
    return jobs if jobs and all(j["state"] in ("done", "failed") for j in jobs) else None


def test_chest_ct_runs_the_lung_model(node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory(LUNG_RULES).start(timeout=120)
    assert storescu(node.port, chest).returncode == 0
    jobs = node.wait_for(lambda: _done(node), timeout=240, interval=0.5)
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["state"] == "done", job
    assert job["model"] == "lung_density"
    result = job["result"]
    total = dict(result["measurements"]["total"])
    litres = total["volume"][0] / 1000
    assert 2.0 <= litres <= 8.0, f"total lung volume {litres:.2f} l outside the adult range"
    assert total["volume"][1] == "ml"
    labels = np.load(node.storage / result["labels_path"])["labels"]
    assert labels.shape == (64, 512, 512)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert len(result["sop_instance_uids"]) == 64
    assert "model lung_density 1.0.0 loaded" in node.log() or "lung_density" in node.log()


def test_head_ct_and_brain_mr_are_not_routed(node_factory: Any) -> None:
    head = dicom_files(shared("rordenlab-dcm_qa_ct"))
    mr = dicom_files(shared("rordenlab-dcm_qa_decubitus"))
    node = node_factory({**LUNG_RULES, "inference": {"preload": False}}).start(timeout=120)
    assert storescu(node.port, head).returncode == 0
    assert storescu(node.port, mr).returncode == 0
    node.wait_for(
        lambda: [s for s in node.status()["studies"] if s["state"] == "complete"].__len__() == 2,
        timeout=60,
    )
    time.sleep(1)
    assert _jobs(node) == []
    assert node.log().count("no routing rule matched") == 2


def test_rules_test_explains(tmp_path: Path) -> None:
    import yaml

    head = shared("rordenlab-dcm_qa_ct")
    mr = shared("rordenlab-dcm_qa_decubitus")
    chest = shared("tcia-lung-pet-ct-dx")
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(yaml.safe_dump({"routing": LUNG_RULES["routing"]}))
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode", "rules", "test", "--config", str(cfg),
         str(chest), str(head), str(mr)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert out.count("SELECTED") == 1
    assert "BodyPartExamined 'HEAD' does not match" in out
    assert "Modality is MR, not CT" in out
    assert "orientation is sagittal, not axial" in out


@pytest.mark.slow
def test_kill_during_inference_runs_the_job_once(node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory(LUNG_RULES).start(timeout=120)
    assert storescu(node.port, chest).returncode == 0
    node.wait_for(lambda: "job 1 started" in node.log(), timeout=120, interval=0.05)
    node.kill9()
    jobs = _jobs(node)
    assert jobs and jobs[0]["state"] == "leased"  # it was running when the node died
    node.start(timeout=120)
    jobs = node.wait_for(lambda: _done(node), timeout=240, interval=0.5)
    assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs
    assert jobs[0]["attempts"] == 2
    results = list((node.storage / "results").rglob("prediction.json"))
    assert len(results) == 1
    meta = json.loads(results[0].read_text())
    assert meta["job_key"] == jobs[0]["key"]
