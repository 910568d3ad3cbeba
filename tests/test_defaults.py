"""The node does its main job on its embedded defaults: with no routing in the config, an
axial chest CT goes to lung_density, and with no destination its SEG and SR are still
encoded, checked, stored and indexed in the node, so QIDO-RS/WADO-RS serve them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, dicom_files, shared, storescu

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_config_show_prints_the_default_rule() -> None:
    out = subprocess.run([sys.executable, "-m", "dicomnode", "config", "show"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    effective = yaml.safe_load(out)
    (rule,) = effective["routing"]
    assert rule["model"] == "lung_density" and rule["keep"] == ["seg", "sr"]
    assert rule["match"]["modality"] == ["CT"] and rule["match"]["orientation"] == "axial"
    assert effective["destinations"] == []


def test_a_chest_ct_gets_seg_and_sr_kept_in_the_node_with_no_routing_config(
        node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory({"models_dir": str(ROOT / "models")})
    settings = dict(node.settings)
    del settings["routing"]  # the embedded default rule applies
    node.config_path.write_text(yaml.safe_dump(settings))
    node.start(timeout=120)
    assert storescu(node.port, chest).returncode == 0

    def done() -> dict[str, Any] | None:
        jobs = node.status()["jobs"]
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "failed") else None

    job = node.wait_for(done, timeout=300, interval=1.0)
    assert job["state"] == "done" and job["model"] == "lung_density", job
    study_uid = job["study_uid"]
    url = f"http://127.0.0.1:{node.http_port}/dicom-web/studies/{study_uid}/instances"
    instances = json.loads(urllib.request.urlopen(url, timeout=10).read())
    classes = [i["00080016"]["Value"][0] for i in instances]
    assert classes.count(SEG) == 1 and classes.count(COMPREHENSIVE_3D_SR) == 1
    assert len(classes) == len(chest) + 2
    result_dir = Path(node.storage)
    assert any(result_dir.glob("results/*/objects/seg/*.dcm"))
