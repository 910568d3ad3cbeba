"""The inference worker: a failing model ends failed with its error; others go on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicomnode.config import parse_config
from dicomnode.core.index import Index, InstanceRecord
from dicomnode.inference.runtime import Prediction
from dicomnode.ingest.spool import Spool
from dicomnode.queue.base import JobState
from dicomnode.queue.sqlite import SQLiteJobQueue
from dicomnode.synthetic import make_ct_series
from dicomnode.worker.inference import InferenceWorker


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class GoodModel:
    def predict(self, volume: Any) -> Prediction:
        labels = (volume.array < -500).astype(np.uint8)
        return Prediction(labels, {"total": {"volume": (float(labels.sum()), "ml")}},
                          "good", "1.0", "cpu", 0.01)


class BadModel:
    def predict(self, volume: Any) -> Prediction:
        raise RuntimeError("out of GPU memory (simulated)")


class Pool:
    def get(self, name: str) -> Any:
        return {"good": GoodModel(), "bad": BadModel()}[name]


def _ingest(spool: Spool, index: Index, files: list[Path]) -> tuple[str, str]:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        size = spool.store(target, [f.read_bytes()])
        index.add_instance(InstanceRecord(
            ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
            "1.2.840.10008.1.2.1", "TEST", size, 1.0, str(target.relative_to(spool.root))))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_failing_job_ends_failed_and_others_run(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    config = parse_config({"storage": str(storage), "inference": {"max_attempts": 2}})
    spool, index = Spool(storage), Index(Index.path_for(storage))
    study, series = _ingest(spool, index, make_ct_series(tmp_path / "a", 8, 32, 32))
    clock = Clock()
    queue = SQLiteJobQueue(SQLiteJobQueue.path_for(storage), clock=clock, backoff_base=5,
                           backoff_max=10)
    payload = {"study_uid": study, "revision": 1, "series_uid": series, "rule": "r",
               "destinations": []}
    bad = queue.add("k-bad", "bad", payload, max_attempts=2)
    good = queue.add("k-good", "good", payload)
    worker = InferenceWorker(config, index, queue, Pool(), owner="test-worker")  # type: ignore[arg-type]

    for _ in range(6):  # drive the worker loop by hand, advancing the clock past backoffs
        jobs = queue.acquire(worker.owner, 60)
        if jobs:
            worker.run_job(jobs[0])
        clock.now += 20

    bad_job, good_job = queue.get(bad.id), queue.get(good.id)
    assert bad_job is not None and good_job is not None
    assert bad_job.state is JobState.FAILED and bad_job.attempts == 2
    assert "out of GPU memory" in (bad_job.last_error or "")
    assert good_job.state is JobState.DONE
    result = good_job.result or {}
    meta = json.loads((worker.result_dir(good_job) / "prediction.json").read_text())
    assert meta["job_key"] == "k-good" and result["labels_path"] == meta["labels_path"]
    labels = np.load(storage / meta["labels_path"])["labels"]
    assert labels.shape == (8, 32, 32) and labels.any()
    queue.close()
    index.close()
