"""The audit trail of a real run: every stage leaves a record, nothing readable leaks,
the trail verifies, and an unsafe key stops the node from starting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
from conftest import ROOT, NodeProcess, dicom_files, shared, storescu


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config",
                           str(node.config_path)], capture_output=True, text=True, timeout=120)


def test_full_run_audits_every_stage_and_leaks_no_patient_data(node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    head = pydicom.dcmread(chest[0], stop_before_pixels=True)
    patient_id, patient_name = str(head.PatientID), str(head.PatientName)
    node = node_factory({
        "models_dir": str(ROOT / "models"),
        "routing": [{"name": "lung", "model": "lung_density",
                     "match": {"modality": ["CT"], "body_part": "chest"}}],
    }).start(timeout=120)
    assert storescu(node.port, chest).returncode == 0
    node.wait_for(lambda: [j for j in node.status()["jobs"] if j["state"] == "done"],
                  timeout=240, interval=0.5)
    assert node.stop() == 0

    verify = _cli(node, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK" in verify.stdout

    exported = _cli(node, "audit", "export", "--format", "json")
    assert exported.returncode == 0, exported.stderr
    records = json.loads(exported.stdout)
    kinds = {(r["event"]["EventIdentification"]["EventID"]["originalText"],
              tuple(t["originalText"] for t in r["event"]["EventIdentification"].get(
                  "EventTypeCode", [])))
             for r in records}
    texts = " ".join(f"{a} {' '.join(b)}" for a, b in kinds)
    for expected in ("Application Start", "Login", "DICOM Instances Transferred",
                     "Study Completed", "Job Started", "Job Finished", "Application Stop",
                     "Software Configuration"):
        assert expected.lower() in texts.lower(), (expected, sorted(kinds))
    assert patient_id in exported.stdout  # decrypted for whoever holds the key

    xml = _cli(node, "audit", "export", "--format", "xml")
    assert xml.returncode == 0 and "<AuditMessage>" in xml.stdout

    # nothing on disk in the audit trail, and nothing in the log, names the patient
    for path in [*(node.storage / "audit").rglob("*"), node.log_path]:
        if path.is_file():
            data = path.read_bytes()
            assert patient_id.encode() not in data, path
            assert patient_name.encode() not in data, path


def test_world_readable_key_refuses_to_start(node_factory: Any) -> None:
    node = node_factory().start()
    assert node.stop() == 0
    key = next((node.storage / "keys").glob("data-*.json"))
    os.chmod(key, 0o644)
    out = subprocess.run([sys.executable, "-m", "dicomnode", "serve", "--config",
                          str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert key.name in out.stderr and "error:" in out.stderr


def test_tampering_is_named_by_the_cli(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory().start()
    assert node.stop() == 0
    segment = sorted((node.storage / "audit" / "node").glob("audit-*.log"))[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    out = _cli(node, "audit", "verify", "--no-record")
    assert out.returncode == 1
    assert "PROBLEM" in out.stdout and segment.name in out.stdout
