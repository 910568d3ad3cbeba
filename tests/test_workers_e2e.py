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
        got = receiver.received()
        return got if got.get("SEG") and got.get("SR") else None

    return node.wait_for(arrived, timeout=timeout, interval=0.5)  # type: ignore[no-any-return]


def _send_study(node: Any, folder: Path, n: int = 24) -> list[Path]:
    files = make_series(folder, n=n, size=64)
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    return files


def _metrics(node: Any) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as f:
        return f.read().decode()


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
    queues = node.status()["queues"]
    assert queues["models"]["air_threshold"]["done"] == 1
    assert queues["broker"]["up"] is True
    (w,) = queues["workers"]
    assert w["name"] == "gpu-box-1" and w["state"] == "idle" and w["jobs_done"] == 1
    worker.stop()
    assert node.stop() == 0


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
