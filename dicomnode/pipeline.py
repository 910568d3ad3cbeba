"""From a completed study to stored predictions: routing sink and inference worker.

``RoutingSink`` is the completion stage's next stage: it reads the study's series
from the index, applies the routing rules and adds one durable job per decision
(idempotent keys, so a repeated hand-off after a crash adds nothing). The
``InferenceWorker`` acquires jobs with a lease (extended while the model runs),
loads the series as a volume, runs the model (loaded once, warm on its device)
and stores the prediction atomically under ``results/``; a job in flight when the
node dies is reaped at start-up and runs again, and its result is written once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Completion, Index
from dicomnode.export.outbox import Outbox
from dicomnode.queue.base import Job, JobQueue, Priority
from dicomnode.routing.rules import decide, read_header, series_info_from_dataset

LOG = logging.getLogger(__name__)


def job_key(study_uid: str, revision: int, rule: str, series_uid: str, model: str) -> str:
    return f"{study_uid}/{revision}/{rule}/{series_uid}/{model}"


class RoutingSink:
    """Turns each completed study revision into jobs, by the configured rules."""

    def __init__(self, config: NodeConfig, index: Index, queue: JobQueue,
                 on_job: Any = None, audit: Audit | None = None) -> None:
        self.config = config
        self.audit: Audit = audit or NullAudit()
        self.index = index
        self.queue = queue
        self.storage = Path(config.storage)
        self._on_job = on_job

    def study_completed(self, completion: Completion) -> None:
        from dicomnode.audit import events

        series = []
        patient = ("", "")
        for series_uid, rows in self.index.study_series(completion.study_uid).items():
            try:
                ds = read_header(self.storage / rows[0]["path"])
            except Exception as exc:
                LOG.warning("series %s: cannot read a header for routing: %s", series_uid, exc)
                continue
            patient = (str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""))
            series.append(series_info_from_dataset(
                ds, len(rows), calling_ae=rows[0]["calling_ae"], called_ae=rows[0]["called_ae"]))
        self.audit.record(events.study_completed,
            completion.study_uid, completion.revision, completion.instance_count, *patient)
        decisions = decide(self.config.routing, series)
        for d in decisions:
            self.audit.record(events.rule_matched, completion.study_uid, d.rule, d.model)
        if not decisions:
            self.audit.record(events.rule_matched, completion.study_uid, None, None)
            LOG.info("study %s revision %d: no routing rule matched its %d series; nothing runs",
                     completion.study_uid, completion.revision, len(series))
            return
        for d in decisions:
            key = job_key(completion.study_uid, completion.revision, d.rule, d.series.series_uid,
                          d.model)
            job = self.queue.add(
                key,
                d.model,
                {
                    "study_uid": completion.study_uid,
                    "revision": completion.revision,
                    "series_uid": d.series.series_uid,
                    "rule": d.rule,
                    "destinations": self.config.resolve_destinations(
                        d.destinations, d.series.calling_ae),
                },
                priority=Priority.STAT if d.priority == "stat" else Priority.ROUTINE,
                max_attempts=self.config.inference.max_attempts,
            )
            LOG.info("study %s revision %d: rule %s -> model %s on series %s (job %s, %s)",
                     completion.study_uid, completion.revision, d.rule, d.model,
                     d.series.series_uid, job.id, d.priority)
        if self._on_job is not None:
            self._on_job()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ModelPool:
    """Loads each model once, on first use or at start-up, and keeps it warm."""

    def __init__(self, models_dir: Path, device: str) -> None:
        self.models_dir = Path(models_dir)
        self.device = device
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                from dicomnode.inference.runtimes import load_model

                folder = self.models_dir / name
                if not (folder / "manifest.yaml").is_file():
                    raise FileNotFoundError(f"model {name!r}: no manifest at {folder}")
                model = load_model(folder, self.device)
                self._models[name] = model
            return model


class InferenceWorker:
    """Runs queued jobs one at a time in a background thread."""

    def __init__(self, config: NodeConfig, index: Index, queue: JobQueue, pool: ModelPool,
                 owner: str | None = None, outbox: Outbox | None = None,
                 on_enqueued: Callable[[], None] | None = None,
                 audit: Audit | None = None, metrics: Any = None) -> None:
        self.config = config
        self.audit: Audit = audit or NullAudit()
        self.metrics = metrics
        self.outbox = outbox
        self._on_enqueued = on_enqueued
        self.index = index
        self.queue = queue
        self.pool = pool
        self.owner = owner or f"worker-{os.getpid()}-{threading.get_ident()}"
        self._held_labels: tuple[str, np.ndarray] | None = None
        self.results = Path(config.storage) / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.queue.acquire(self.owner, self.config.inference.lease_seconds, limit=1)
            except Exception:
                LOG.exception("cannot acquire jobs; retrying")
                jobs = []
            if not jobs:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.run_job(jobs[0])

    def result_dir(self, job: Job) -> Path:
        return self.results / hashlib.sha256(job.key.encode()).hexdigest()[:32]

    def run_job(self, job: Job) -> None:
        """Run one leased job to its end (done, retried later, or failed)."""
        from dicomnode.audit import events

        LOG.info("job %s started: %s on series %s (attempt %d of %d)", job.id, job.model,
                 job.payload["series_uid"], job.attempts, job.max_attempts)
        audit_job = (str(job.id), job.model, "", job.payload["study_uid"], job.payload["series_uid"])
        self.audit.record(events.job, "started", *audit_job)
        lease = self.config.inference.lease_seconds
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(lease / 3):
                if not self.queue.extend(job.id, self.owner, lease):
                    LOG.warning("job %s: lease lost while running", job.id)
                    return

        beat = threading.Thread(target=heartbeat, name=f"lease-{job.id}", daemon=True)
        beat.start()
        try:
            result = self._infer(job)
            result["objects"] = self._deliver(job, result)
        except Exception as exc:
            done.set()
            LOG.exception("job %s (%s) failed", job.id, job.model)
            self.audit.record(events.job, "failed", *audit_job, error=f"{type(exc).__name__}")
            if self.metrics is not None:
                self.metrics.job_finished(job.model, "failed")
            try:
                released = self.queue.release(job.id, self.owner, error=f"{type(exc).__name__}: {exc}")
                LOG.warning("job %s is now %s after %d attempt(s)", job.id,
                            released.state.name.lower(), released.attempts)
            except Exception:
                LOG.exception("job %s: cannot record the failure", job.id)
            return
        done.set()
        if self.metrics is not None:
            self.metrics.job_finished(job.model, "done", float(result.get("seconds", 0.0)))
        self.audit.record(events.job, "finished", str(job.id), job.model,
                                     str(result.get("model_version", "")),
                                     job.payload["study_uid"], job.payload["series_uid"])
        try:
            self.queue.release(job.id, self.owner, result=result)
            LOG.info("job %s done: %s on series %s in %.2f s", job.id, job.model,
                     job.payload["series_uid"], result["seconds"])
        except Exception:
            LOG.exception("job %s: cannot record its result", job.id)

    def _source_paths(self, study_uid: str, series_uid: str, sop_uids: list[str]) -> list[Path]:
        rows = self.index.study_series(study_uid).get(series_uid) or []
        by_uid = {r["sop_instance_uid"]: r["path"] for r in rows}
        missing = [u for u in sop_uids if u not in by_uid]
        if missing:
            raise FileNotFoundError(f"{len(missing)} source instance(s) are no longer stored")
        storage = Path(self.config.storage)
        return [storage / by_uid[u] for u in sop_uids]

    def _replaced(self, job: Job) -> dict[str, tuple[str, ...]]:
        """The objects of the previous revision of this study's result, if it made any."""
        p = job.payload
        if int(p["revision"]) <= 1:
            return {}
        for earlier in self.queue.list(states=["done"]):
            q = earlier.payload
            if (q.get("study_uid"), q.get("series_uid"), q.get("rule"), earlier.model,
                    int(q.get("revision", 0))) == (p["study_uid"], p["series_uid"], p["rule"],
                                                   job.model, int(p["revision"]) - 1):
                objects = (earlier.result or {}).get("objects") or {}
                return {k: tuple(v) for k, v in objects.items()}
        return {}

    def _deliver(self, job: Job, result: dict[str, Any]) -> dict[str, list[str]]:
        """Encode the objects the job's destinations ask for and queue them for each."""
        from dicomnode.results import encode_input, encode_objects, kinds_for

        names = list(job.payload.get("destinations") or [])
        configured = {d.name: d for d in self.config.destinations}
        unknown = [n for n in names if n not in configured]
        if unknown:
            raise ValueError(f"unknown destination(s) {', '.join(unknown)}")
        destinations = [configured[n] for n in names]
        kinds = kinds_for(destinations)
        if not kinds:
            return {}
        manifest = self.pool.get(job.model).manifest
        sources = self._source_paths(result["study_uid"], result["series_uid"],
                                     list(result["sop_instance_uids"]))
        held = self._held_labels
        labels = held[1] if held is not None and held[0] == job.key else None
        self._held_labels = None
        inp = encode_input(result, manifest, Path(self.config.storage), sources,
                           self._replaced(job), labels=labels)
        objects = encode_objects(inp, kinds, self.result_dir(job) / "objects")
        self._index_results([p for paths in objects.values() for p in paths])
        if self.outbox is not None:
            for dest in destinations:
                files = [f for k in dest.objects for f in objects.get(k, [])]
                self.outbox.enqueue(dest.name, files, key=job.key)
                LOG.info("job %s: %d object(s) queued for %s", job.id, len(files), dest.name)
            if self._on_enqueued is not None:
                self._on_enqueued()
        return {k: [p.stem for p in v] for k, v in objects.items()}

    def _index_results(self, paths: list[Path]) -> None:
        """Index the result objects (origin 'result') so that QIDO-RS/WADO-RS serve them;
        they never re-open the study nor take part in routing."""
        from pydicom import dcmread

        from dicomnode.core.index import InstanceRecord

        storage = Path(self.config.storage)
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            meta = ds.file_meta
            self.index.add_instance(InstanceRecord(
                sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(meta.TransferSyntaxUID), calling_ae=self.config.ae_title,
                size=path.stat().st_size, received_at=time.time(),
                path=str(path.relative_to(storage)), called_ae=self.config.ae_title,
                origin="result",
            ))

    def _infer(self, job: Job) -> dict[str, Any]:
        from dicomnode.inference.volume import load_series

        out_dir = self.result_dir(job)
        meta_path = out_dir / "prediction.json"
        if meta_path.is_file():  # a previous attempt finished but died before release
            return dict(json.loads(meta_path.read_text()))
        rows = self.index.study_series(job.payload["study_uid"]).get(job.payload["series_uid"])
        if not rows:
            raise FileNotFoundError(f"series {job.payload['series_uid']} is not in the index")
        storage = Path(self.config.storage)
        started = time.perf_counter()
        volume = load_series([storage / r["path"] for r in rows])
        model = self.pool.get(job.model)
        prediction = model.predict(volume)
        seconds = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        buf = _npz_bytes(prediction.labels)
        self._held_labels = (job.key, prediction.labels)  # handed to the encoder as is
        _atomic_write(out_dir / "labels.npz", buf)
        result = {
            "job_key": job.key,
            "model": prediction.model_name or job.model,
            "model_version": prediction.model_version,
            "device": prediction.device,
            "study_uid": job.payload["study_uid"],
            "series_uid": job.payload["series_uid"],
            "revision": job.payload["revision"],
            "destinations": job.payload["destinations"],
            "sop_instance_uids": list(volume.sop_instance_uids),
            "shape": list(prediction.labels.shape),
            "labels_path": str((out_dir / "labels.npz").relative_to(storage)),
            "measurements": {k: {m: list(v) for m, v in q.items()}
                             for k, q in prediction.measurements.items()},
            "seconds": seconds,
            "model_seconds": prediction.seconds,
        }
        _atomic_write(meta_path, json.dumps(result, indent=1).encode())
        return result


def _npz_bytes(labels: np.ndarray) -> bytes:
    """``labels`` as an .npz (np.load reads it) deflated at level 1: label maps are
    mostly zeros, so the fast level already shrinks them ~50x, at a fraction of the
    time of numpy's default level."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open("labels.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.uint8))
    return buf.getvalue()
