"""The running node's HTTP side: health, readiness, metrics of a real run, and
DICOMweb behind its tokens."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from typing import Any

from conftest import dicom_files, shared, storescu
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.synthetic import make_ct_series

TOKEN = "test-token-not-a-secret"


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_health_readiness_and_metrics_of_a_run(node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory().start()
    base = f"http://127.0.0.1:{node.http_port}"
    assert _get(f"{base}/healthz")[0] == 200
    status, body = _get(f"{base}/readyz")
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"
    assert storescu(node.port, chest).returncode == 0
    node.wait_for(lambda: node.status()["studies"][0]["state"] == "complete", timeout=60)
    status, body = _get(f"{base}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    stored = sum(s.value for s in families["dicomnode_index_instances"].samples)
    assert stored == len(chest)
    accepted = [s for s in families["dicomnode_associations"].samples
                if s.labels.get("result") == "accepted" and s.name.endswith("_total")]
    assert accepted and accepted[0].value >= 1
    assert "dicomnode_jobs" in families and "dicomnode_index_completions" in families


def test_dicomweb_needs_the_token(node_factory: Any, tmp_path: Any) -> None:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    node = node_factory({"http": {"tokens": [{"name": "pacs", "sha256": digest}]}}).start()
    base = f"http://127.0.0.1:{node.http_port}"
    assert storescu(node.port, make_ct_series(tmp_path / "s", 2, 32, 32)).returncode == 0
    assert _get(f"{base}/dicom-web/studies")[0] == 401
    assert _get(f"{base}/dicom-web/studies", token="wrong")[0] == 401
    status, body = _get(f"{base}/dicom-web/studies", token=TOKEN)
    assert status == 200 and len(json.loads(body)) == 1
    assert _get(f"{base}/healthz")[0] == 200  # probes need no token


def test_stow_rs_into_the_node_is_stored_completed_and_audited(node_factory: Any,
                                                                tmp_path: Any) -> None:
    import subprocess
    import sys

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    files = make_ct_series(tmp_path / "s", 3, 32, 32)
    node = node_factory().start()
    client = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicom-web")
    client.store_instances([pydicom.dcmread(f) for f in files])
    study = node.wait_for(lambda: [s for s in node.status()["studies"]
                                   if s["state"] == "complete"], timeout=60)[0]
    assert study["instances"] == 3 and study["calling_ae"] == "STOW-RS"  # completes like C-STORE
    assert node.stop() == 0
    out = subprocess.run([sys.executable, "-m", "dicomnode", "audit", "export", "--config",
                          str(node.config_path)], capture_output=True, text=True, timeout=60)
    records = json.loads(out.stdout)
    transferred = [r for r in records
                   if r["event"]["EventIdentification"]["EventID"]["originalText"]
                   == "DICOM Instances Transferred" and "STOW-RS" in json.dumps(r)]
    assert len(transferred) == 1
    assert "SYNTH0001" in json.dumps(transferred[0])  # patient only inside the encrypted record


def test_results_are_served_by_qido_and_wado_and_do_not_reopen_the_study(
        node_factory: Any) -> None:
    from conftest import ROOT, free_port

    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory({
        "models_dir": str(ROOT / "models"),
        # a PACS that is down: results are made and kept in the outbox meanwhile
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": free_port(), "objects": ["seg", "sr"]}],
        "routing": [{"name": "lung", "model": "lung_density", "destinations": ["pacs"],
                     "match": {"modality": ["CT"], "body_part": "chest"}}],
    }).start(timeout=120)
    assert storescu(node.port, chest).returncode == 0
    node.wait_for(lambda: [j for j in node.status()["jobs"] if j["state"] == "done"],
                  timeout=240, interval=0.5)
    base = f"http://127.0.0.1:{node.http_port}/dicom-web"
    study_uid = node.status()["studies"][0]["study_uid"]
    status, body = _get(f"{base}/studies/{study_uid}/series")
    assert status == 200
    modalities = sorted(s["00080060"]["Value"][0] for s in json.loads(body))
    assert modalities == ["CT", "SEG", "SR"]
    seg_series = next(s for s in json.loads(body) if s["00080060"]["Value"][0] == "SEG")
    seg_series_uid = seg_series["0020000E"]["Value"][0]
    status, body = _get(f"{base}/studies/{study_uid}/series/{seg_series_uid}/metadata")
    assert status == 200 and json.loads(body)[0]["00080016"]["Value"][0] == \
        "1.2.840.10008.5.1.4.1.1.66.4"
    # and the way a DICOMweb client reads them back
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(base)
    [seg_instance] = client.search_for_instances(study_uid, seg_series_uid)
    seg = client.retrieve_instance(study_uid, seg_series_uid,
                                   seg_instance["00080018"]["Value"][0])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study_uid
    assert len(seg.SegmentSequence) == 2
    import time

    time.sleep(2)  # more than the quiet window: a re-opened study would complete again
    studies = node.status()["studies"]
    assert len(studies) == 1 and studies[0]["revision"] == 1 and studies[0]["state"] == "complete"
    assert studies[0]["instances"] == len(chest) + 2  # the CT plus its SEG and SR, listed
    assert len(node.status()["jobs"]) == 1  # results were not routed as a new study


def test_cors_for_a_viewer_on_another_origin(node_factory: Any) -> None:
    node = node_factory({"http": {"cors_origins": ["http://viewer.example"]}}).start()
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.http_port}/dicom-web/studies", method="OPTIONS",
        headers={"Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
