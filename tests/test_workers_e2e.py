"""Remote workers, end to end, with real processes on loopback (issue 12).

redis-server (AOF on), a node (``dicomnode serve`` with ``queue.backend: celery``), one or
two ``dicomnode worker`` processes started from folders of their own with their own
``--storage``, DCMTK storescu as the modality and storescp as the PACS. The model is the
test model ``air_threshold`` (tests/data/worker_models), whose ``delay.txt`` stands in
for a slow GPU model, so that faults can be timed: kill -9 of a worker mid-job, Redis
stopped and restarted, the node restarted while a worker runs. Every test checks that
exactly one result set (one SEG, one SR) reaches the PACS and that the model ran as often
as it had to, never twice for one job.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_series, storescu
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from workers import DicomReceiver, WorkerProcess, celery_node_settings, copy_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def receiver(tmp_path: Path) -> Any:
    r = DicomReceiver(tmp_path / "pacs")
    yield r
    r.stop()


@pytest.fixture
def worker_factory(tmp_path: Path) -> Any:
    made: list[WorkerProcess] = []

    def make(name: str, broker: RedisServer, node: Any, **kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(tmp_path / "elsewhere" / name, broker.url,
                          f"http://127.0.0.1:{node.http_port}", **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill9()


def _jobs(node: Any) -> list[dict[str, Any]]:
    return list(node.status()["jobs"])


def _job_state(node: Any) -> str | None:
    jobs = _jobs(node)
    return jobs[0]["state"] if jobs else None


def _results(receiver: DicomReceiver, node: Any, timeout: float = 120) -> dict[str, list[Path]]:
    def arrived() -> dict[str, list[Path]] | None:
        import pydicom

        got = receiver.received()
        if not (got.get("SEG") and got.get("SR")):
            return None
        try:  # whole files: storescp may still be writing the last one
            for path in got["SEG"] + got["SR"]:
                pydicom.dcmread(path)
        except Exception:
            return None
        return got

    return node.wait_for(arrived, timeout=timeout, interval=0.5)  # type: ignore[no-any-return]


def _send_study(node: Any, folder: Path, n: int = 24) -> list[Path]:
    files = make_series(folder, n=n, size=64)
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    return files


def _metrics(node: Any) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as f:
        return f.read().decode()


def _audit(node: Any) -> list[dict[str, Any]]:
    """The node's audit records (decrypted with its keys)."""
    from conftest import run_cli

    out = run_cli("audit", "export", "--format", "json", "--config", str(node.config_path))
    assert out.returncode == 0, out.stderr
    return [r["event"] for r in json.loads(out.stdout)]


def _events(records: list[dict[str, Any]], meaning: str) -> list[dict[str, Any]]:
    return [r for r in records
            if r["EventIdentification"]["EventID"]["originalText"] == meaning]


def _node(node_factory: Any, broker: RedisServer, tmp_path: Path, receiver: Any,
          **kwargs: Any) -> Any:
    models = copy_model(tmp_path / "node-models")
    return node_factory(celery_node_settings(broker.url, models, receiver, **kwargs))


def test_a_worker_elsewhere_computes_seg_and_sr_and_without_one_nothing_runs(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        worker_factory: Any, tmp_path: Path) -> None:
    node = _node(node_factory, redis_server, tmp_path, receiver).start(timeout=60)
    files = _send_study(node, tmp_path / "ct")
    node.wait_for(lambda: _job_state(node) == "pending", timeout=60)
    # no worker: the job waits on the broker and nothing is computed
    node.wait_for(lambda: "handed to the broker" in node.log(), timeout=30)
    assert redis_server.client().llen("dicomnode.air_threshold\x06\x169") == 1
    assert _job_state(node) == "pending"
    assert not list((node.storage / "results").rglob("prediction.json"))
    assert receiver.received() == {}

    worker = worker_factory("gpu-box-1", redis_server, node).start()
    got = _results(receiver, node)
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    (job,) = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=30)
    assert job["attempts"] == 1 and worker.runs() == 1
    assert job["result"]["worker"] == "gpu-box-1"

    # the SEG lies on the source slices and holds what the model computes in-process
    import highdicom as hd
    import pydicom

    from dicomnode.inference.runtimes import load_model
    from dicomnode.inference.volume import load_series

    volume = load_series(files)
    expected = load_model(worker.models_dir / "air_threshold", "cpu").predict(volume).labels
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(got["SEG"][0]))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), segment_numbers=[1])[..., 0]
    assert np.array_equal(pixels.astype(bool), expected == 1)
    assert expected.any()

    # heartbeats and queue depth per model: /metrics and dicomnode status
    metrics = _metrics(node)
    assert 'dicomnode_workers{state="alive"} 1.0' in metrics
    assert 'dicomnode_jobs_by_model{model="air_threshold",state="done"} 1.0' in metrics
    assert 'dicomnode_worker_jobs_done{worker="gpu-box-1"} 1.0' in metrics
    assert 'dicomnode_broker_messages{kind="routine",queue="dicomnode.air_threshold"} 0.0' \
        in metrics
    # the worker says it is idle again in its next heartbeat
    queues = node.wait_for(lambda: (lambda q: q if q["workers"] and q["workers"][0]["state"]
                                    == "idle" else None)(node.status()["queues"]), timeout=30)
    assert queues["models"]["air_threshold"]["done"] == 1
    assert queues["broker"]["up"] is True
    (w,) = queues["workers"]
    assert w["name"] == "gpu-box-1" and w["state"] == "idle" and w["jobs_done"] == 1
    worker.stop()
    assert node.stop() == 0

    # the fetch is audited: the worker is the destination, no patient object goes with it
    (sent,) = [e for e in _events(_audit(node), "DICOM Instances Transferred")
               if any(p.get("UserID") == "gpu-box-1" for p in e["ActiveParticipant"])]
    assert sent["EventIdentification"]["EventActionCode"] == "R"
    assert all(o.get("ParticipantObjectTypeCodeRole") != 1
               for o in sent["ParticipantObjectIdentification"])


def test_kill9_of_a_worker_mid_job_another_worker_completes_it_once(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        worker_factory: Any, tmp_path: Path) -> None:
    node = _node(node_factory, redis_server, tmp_path, receiver, lease_seconds=4.0).start(
        timeout=60)
    slow = worker_factory("slow", redis_server, node, delay=120).start().wait_ready()
    _send_study(node, tmp_path / "ct")
    node.wait_for(lambda: "sent to worker slow" in node.log(), timeout=60)
    slow.kill9()  # mid-job: the model sleeps for two minutes
    fast = worker_factory("fast", redis_server, node, delay=0).start()
    got = _results(receiver, node)
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["attempts"] == 2
    assert job["result"]["worker"] == "fast"
    assert slow.runs() == 0 and fast.runs() == 1
    assert "lease of slow:" in node.log() and "expired" in node.log()
    fast.stop()
    node.stop()
    assert len(receiver.received()["SEG"]) == 1


def _metric(node: Any, name: str) -> float | None:
    for line in _metrics(node).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_redis_down_and_back_jobs_are_neither_lost_nor_run_twice(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        worker_factory: Any, tmp_path: Path) -> None:
    node = _node(node_factory, redis_server, tmp_path, receiver, visibility_timeout=15.0).start(
        timeout=60)
    # study A is handed to the broker; then Redis stops (SIGTERM: its AOF is flushed)
    _send_study(node, tmp_path / "a")
    node.wait_for(lambda: "job 1 handed to the broker" in node.log(), timeout=60)
    redis_server.stop()
    # the node keeps receiving; study B's job waits in the node for the broker
    _send_study(node, tmp_path / "b")
    node.wait_for(lambda: len(_jobs(node)) == 2, timeout=60)
    broker = node.wait_for(lambda: (b := node.status()["queues"]["broker"])
                           and b.get("handoffs_waiting") == 1 and b)
    assert broker["up"] is False
    assert _metric(node, "dicomnode_broker_handoffs_waiting") == 1.0
    redis_server.start()  # same data folder: the AOF brings job 1's message back
    node.wait_for(lambda: "job 2 handed to the broker" in node.log(), timeout=30)
    assert node.status()["queues"]["broker"]["handoffs_waiting"] == 0

    # a worker takes job 1; Redis goes away while the model runs and comes back after the
    # result was handed back (over HTTP): the acknowledgement waits for Redis, then job 2
    # runs; job 1's message is not delivered again
    worker = worker_factory("w1", redis_server, node, delay=4, visibility_timeout=15.0).start()
    node.wait_for(lambda: "sent to worker w1" in node.log(), timeout=90)
    redis_server.stop()
    worker.wait_log("job 1 handed back: done", timeout=60)
    worker.wait_log("acknowledgement of message", timeout=30)
    redis_server.start()
    got = node.wait_for(lambda: len(receiver.received().get("SEG", [])) == 2
                        and receiver.received(), timeout=120, interval=0.5)
    assert len(got["SEG"]) == 2 and len(got["SR"]) == 2
    jobs = _jobs(node)
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert [j["attempts"] for j in jobs] == [1, 1]
    assert worker.runs() == 2
    worker.stop()
    node.stop()
    assert len(receiver.received()["SEG"]) == 2


def test_results_handed_back_while_the_node_restarts_are_not_lost(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        worker_factory: Any, tmp_path: Path) -> None:
    node = _node(node_factory, redis_server, tmp_path, receiver).start(timeout=60)
    worker = worker_factory("w1", redis_server, node, delay=3).start().wait_ready()
    _send_study(node, tmp_path / "ct")
    node.wait_for(lambda: "sent to worker w1" in node.log(), timeout=60)
    assert node.stop() == 0  # the node goes away while the model runs
    worker.wait_log("hand back the result", timeout=60)  # ... and retries
    node.start(timeout=60)
    worker.wait_log("job 1 handed back: done", timeout=60)
    got = _results(receiver, node)
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["attempts"] == 1
    assert worker.runs() == 1
    assert "renewed after the node's restart" in node.log()
    worker.stop()
    node.stop()
    assert len(receiver.received()["SEG"]) == 1


def test_a_wrong_token_is_refused_and_a_purged_study_fails_its_job(
        node_factory: Any, redis_server: RedisServer, worker_factory: Any,  # noqa: F811
        tmp_path: Path) -> None:
    import sqlite3

    node = _node(node_factory, redis_server, tmp_path, None).start(timeout=60)
    intruder = worker_factory("intruder", redis_server, node, token="not-the-token").start()
    assert intruder.proc is not None and intruder.proc.wait(60) == 2
    assert "refused this worker's token" in intruder.log()
    assert "worker API request from 127.0.0.1 refused" in node.log()

    files = _send_study(node, tmp_path / "ct")
    node.wait_for(lambda: "job 1 handed to the broker" in node.log(), timeout=60)
    # the study is purged while its job waits for a worker (what retention's first step
    # does: its index rows go, then its files)
    db = sqlite3.connect(node.storage / "index.sqlite3", timeout=30)
    with db:
        db.execute("DELETE FROM instances WHERE study_uid = (SELECT study_uid FROM studies)")
    db.close()
    for f in (node.storage / "studies").rglob("*.dcm"):
        f.unlink()
    assert files
    worker = worker_factory("w1", redis_server, node).start()
    worker.wait_log("no longer stored on this node", timeout=90)
    (job,) = node.wait_for(lambda: [j for j in _jobs(node) if j["state"] == "failed"])
    assert "no longer stored on this node (purged" in job["last_error"]
    assert worker.runs() == 0
    worker.stop()
    node.stop()
    (refused,) = [e for e in _events(_audit(node), "User Authentication")
                  if "worker token" in e["EventIdentification"].get("EventOutcomeDescription", "")]
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == 4


def test_the_chest_ct_comes_back_as_seg_and_sr_from_a_worker_with_the_lung_model(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        worker_factory: Any, tmp_path: Path) -> None:
    import pydicom
    from conftest import ROOT, dicom_files, shared

    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    settings = celery_node_settings(redis_server.url, ROOT / "models", receiver,
                                    model="lung_density", lease_seconds=30,
                                    visibility_timeout=600)
    node = node_factory(settings).start(timeout=60)
    worker = worker_factory("lung-box", redis_server, node, model="lung_density",
                            visibility_timeout=600).start()
    assert storescu(node.port, chest).returncode == 0
    got = _results(receiver, node, timeout=300)
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["result"]["worker"] == "lung-box"
    seg = pydicom.dcmread(got["SEG"][0])
    source = pydicom.dcmread(chest[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {"right lung", "left lung"}
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == set(job["result"]["sop_instance_uids"])
    assert "LAA950" in str(pydicom.dcmread(got["SR"][0]))
    assert any(str(e.get("ManufacturerModelName", "")).startswith("lung_density")
               for e in seg.ContributingEquipmentSequence)
    assert worker.runs() == 1
    worker.stop()
    node.stop()


def test_in_process_true_lets_the_node_run_jobs_itself_beside_the_broker(
        node_factory: Any, redis_server: RedisServer, receiver: DicomReceiver,  # noqa: F811
        tmp_path: Path) -> None:
    node = _node(node_factory, redis_server, tmp_path, receiver,
                 extra={"inference": {"in_process": True}}).start(timeout=60)
    _send_study(node, tmp_path / "ct")
    got = _results(receiver, node)
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    (job,) = _jobs(node)
    assert job["state"] == "done" and "worker" not in job["result"]  # the node's own
    # its message is still on the broker: a worker would find the job done and drop it
    assert redis_server.client().llen("dicomnode.air_threshold\x06\x169") == 1
    node.stop()
