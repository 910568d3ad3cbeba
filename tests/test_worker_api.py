"""The node's worker API, driven by a hand-made worker (the real HTTP client of
``dicomnode worker``) against a real node (``queue.backend: celery``) and a real
redis-server: what a worker receives carries no patient identity, what it hands back is
checked against the job and the manifest, and each token opens only its own door."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import make_series, storescu
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from workers import TOKEN, celery_node_settings, copy_model

from dicomnode.inference.volume import load_series
from dicomnode.worker import wire
from dicomnode.worker.remote import NodeAnswer, NodeClient, TokenRefused

pytestmark = pytest.mark.timeout(180)

DICOMWEB_TOKEN = "dicomweb-token-abcdefghijklmnop"


@pytest.fixture
def node(node_factory: Any, redis_server: RedisServer, tmp_path: Path) -> Any:  # noqa: F811
    models = copy_model(tmp_path / "node-models")
    settings = celery_node_settings(redis_server.url, models, extra={
        "http": {"tokens": [{"name": "viewer",
                             "sha256": hashlib.sha256(DICOMWEB_TOKEN.encode()).hexdigest()}]},
    })
    n = node_factory(settings).start(timeout=60)
    yield n
    n.stop()


def _client(node: Any, owner: str = "fake:1", token: str = TOKEN) -> NodeClient:
    return NodeClient(f"http://127.0.0.1:{node.http_port}", token, owner, owner.split(":")[0],
                      retry_seconds=5)


def _job(node: Any) -> dict[str, Any]:
    (job,) = node.status()["jobs"]
    return dict(job)


def _labels_stream(path: Path, header: dict[str, Any], labels: np.ndarray) -> Path:
    path.write_bytes(b"".join(wire.encode(header, labels, "deflate")))
    return path


def _result_header(job_id: int, keys: list[str], **changes: Any) -> dict[str, Any]:
    header = wire.labels_header(job_id=job_id, model="air_threshold", model_version="1.0.0",
                                device="cpu", seconds=0.1, slice_keys=keys,
                                measurements={"lung": {"volume": (12.5, "ml")}}, worker="fake")
    header.update(changes)
    return header


def test_a_worker_gets_no_patient_identity_and_its_result_is_checked(
        node: Any, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=12, size=32)
    assert storescu(node.port, files).returncode == 0
    node.wait_for(lambda: "job 1 handed to the broker" in node.log(), timeout=60)
    client = _client(node)
    hello = client.heartbeat({"name": "fake", "owner": "fake:1", "host": "h", "models":
                              ["air_threshold"], "device": "cpu", "version": "0", "state": "idle",
                              "job_id": None, "interval": 5, "started_at": time.time(),
                              "jobs_done": 0})
    assert hello["manifests"] == {"air_threshold": "1.0.0"}

    lease = client.claim(1)
    assert lease["model"] == "air_threshold" and lease["attempt"] == 1
    assert client.claim(1)["attempt"] == 1  # asking again (a lost answer) changes nothing
    with pytest.raises(NodeAnswer) as other:
        _client(node, "other:2").claim(1)
    assert other.value.status == 409 and "running on another worker" in other.value.reason
    with pytest.raises(NodeAnswer) as stolen:
        _client(node, "other:2").extend(1)
    assert stolen.value.status == 409
    assert client.extend(1)["lease_seconds"] == 6.0

    # the whole body a worker receives: no name, ID, date or UID of the study
    raw = requests.get(f"http://127.0.0.1:{node.http_port}/workers/v1/jobs/1/input",
                       headers=client.session.headers, timeout=30).content
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    secrets_ = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyDate), str(ds.StudyTime),
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID,
                str(ds.StudyDescription), str(ds.SeriesDescription), "SYNTH"]
    secrets_ += [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    for text in secrets_:
        assert text.encode() not in raw, text
    header, array = wire.decode([raw], wire.VOLUME_FORMAT, wire.VOLUME_DTYPES, 1 << 30)
    assert header["attributes"] == {"KVP": 120.0, "BodyPartExamined": "CHEST",
                                    "PatientSex": "O"}
    assert array.dtype == np.int16  # CT in HU travels as int16, exactly
    volume = load_series(files)
    remote = wire.volume_from(header, array)
    assert np.array_equal(remote.array, volume.array)
    assert np.allclose(remote.affine, volume.affine)
    assert remote.study_uid == "" and remote.frame_of_reference_uid == ""
    keys = list(remote.sop_instance_uids)
    assert len(set(keys)) == 12 and not set(keys) & set(volume.sop_instance_uids)
    deflated = client.input(1, "deflate", 1 << 30)
    assert deflated[0]["slice_keys"] == keys and np.array_equal(deflated[1], array)

    # a label value the manifest does not have: refused, the job backs off (attempt spent)
    labels = (remote.array < -400).astype(np.uint8)
    bad = labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(NodeAnswer) as refused:
        client.result(1, _labels_stream(tmp_path / "bad.wire", _result_header(1, keys), bad))
    assert refused.value.status == 422 and "label values [7]" in refused.value.reason
    assert _job(node)["state"] == "pending"
    assert "label values [7]" in _job(node)["last_error"]

    # round 2: another model version than the node's manifest
    time.sleep(2.1)  # the back-off
    client.claim(1)
    client.input(1, "raw", 1 << 30)
    with pytest.raises(NodeAnswer) as version:
        client.result(1, _labels_stream(tmp_path / "v.wire",
                                        _result_header(1, keys, model_version="9.9"), labels))
    assert version.value.status == 422 and "9.9" in version.value.reason

    # round 3: a stream that is not one; then the valid result, slices in another order
    time.sleep(2.1)
    client.claim(1)
    header, array = client.input(1, "raw", 1 << 30)
    keys = header["slice_keys"]
    junk = tmp_path / "junk.wire"
    junk.write_bytes(b"not a label map at all")
    with pytest.raises(NodeAnswer) as unreadable:
        client.result(1, junk)
    assert unreadable.value.status == 400 and "bad magic" in unreadable.value.reason
    order = list(reversed(range(12)))
    done = client.result(1, _labels_stream(
        tmp_path / "ok.wire", _result_header(1, [keys[i] for i in order]), labels[order]))
    assert done["state"] == "done"
    job = _job(node)
    assert job["state"] == "done" and job["attempts"] == 3
    stored = np.load(node.storage / job["result"]["labels_path"])["labels"]
    assert np.array_equal(stored, labels)  # back in the node's slice order
    assert job["result"]["sop_instance_uids"] == list(volume.sop_instance_uids)
    assert job["result"]["measurements"] == {"lung": {"volume": [12.5, "ml"]}}

    # again: nothing changes (one result set per job); a stale message is dropped
    again = client.result(1, tmp_path / "ok.wire")
    assert again["already"] is True and again["objects"] == done["objects"]
    with pytest.raises(NodeAnswer) as stale:
        client.claim(1)
    assert stale.value.status == 409 and "already done" in stale.value.reason


def test_each_token_opens_only_its_own_door(node: Any) -> None:
    base = f"http://127.0.0.1:{node.http_port}"
    with pytest.raises(TokenRefused, match="not accepted"):
        _client(node, token=DICOMWEB_TOKEN).claim(1)
    answer = requests.post(f"{base}/workers/v1/heartbeat", json={}, timeout=10)
    assert answer.status_code == 401 and "token is required" in answer.json()["error"]
    worker_on_dicomweb = requests.get(f"{base}/dicom-web/studies", timeout=10,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert worker_on_dicomweb.status_code == 401
    viewer = requests.get(f"{base}/dicom-web/studies", timeout=10,
                          headers={"Authorization": f"Bearer {DICOMWEB_TOKEN}"})
    assert viewer.status_code in (200, 204)
    # a known token, but no identity headers / no such job / a bad heartbeat
    no_owner = requests.post(f"{base}/workers/v1/jobs/1/claim", timeout=10,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert no_owner.status_code == 400 and "x-dicomnode-owner" in no_owner.json()["error"]
    with pytest.raises(NodeAnswer) as missing:
        _client(node).claim(999)
    assert missing.value.status == 404
    bad_beat = requests.post(f"{base}/workers/v1/heartbeat", json={"name": 5}, timeout=10,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad_beat.status_code == 400 and "heartbeat" in bad_beat.json()["error"]
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # still open
