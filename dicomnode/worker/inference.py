"""The in-process inference worker: leased jobs, run one at a time in a thread.

A job is acquired with a lease (extended while it runs), its series loaded as a volume
(:func:`~dicomnode.inference.volume.load_series`), the model run (loaded once, warm on
its device) and the prediction stored atomically under the job's result folder as an
:class:`~dicomnode.core.records.InferenceResult`; then the objects its destinations ask
for are encoded, checked, indexed with their :class:`~dicomnode.core.records.ResultSet`
and queued in the outbox. A job in flight when the node dies is reaped at start-up and
runs again: a prediction already stored is not computed twice, objects already written
are reused, and result UIDs are deterministic, so its results are delivered once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import Destination, NodeConfig
from dicomnode.core.index import Index, InstanceRecord
from dicomnode.core.layout import StorageLayout, atomic_write
from dicomnode.core.records import InferenceResult, JobPayload, ResultSet
from dicomnode.core.redact import describe_exception, traceback_text
from dicomnode.export.outbox import Outbox
from dicomnode.queue.base import Job, JobQueue, Priority
from dicomnode.withdrawal import RejectionGate
from dicomnode.worker.buffers import VolumeBuffers
from dicomnode.worker.gpu import GpuScheduler
from dicomnode.worker.pool import ModelPool

if TYPE_CHECKING:  # encode (highdicom) is imported when a job first needs it
    from dicomnode.encode.seg import SegPlan

LOG = logging.getLogger(__name__)


class InferenceWorker:
    """Runs queued jobs in background threads: ``parallel_jobs`` slots for any job, plus
    one kept for STAT jobs, all sharing the device through a :class:`GpuScheduler`."""

    def __init__(self, config: NodeConfig, index: Index, queue: JobQueue, pool: ModelPool,
                 owner: str | None = None, outbox: Outbox | None = None,
                 on_enqueued: Callable[[], None] | None = None,
                 audit: Audit | None = None, metrics: Any = None,
                 withdrawals: RejectionGate | None = None,
                 scheduler: GpuScheduler | None = None) -> None:
        self.config = config
        self.withdrawals = withdrawals
        self.audit: Audit = audit or NullAudit()
        self.metrics = metrics
        self.outbox = outbox
        self._on_enqueued = on_enqueued
        self.index = index
        self.queue = queue
        self.pool = pool
        self.owner = owner or f"worker-{os.getpid()}-{threading.get_ident()}"
        self.layout = StorageLayout(config.storage)
        self.layout.results.mkdir(parents=True, exist_ok=True)
        device = str(getattr(pool, "device", "cpu"))
        self.scheduler = scheduler or GpuScheduler(device)
        parallel = config.inference.parallel_jobs or (2 if device.startswith("cuda") else 1)
        # (owner, most urgent priority it leases or None for any): the last is STAT only
        self.slots: list[tuple[str, Priority | None]] = [
            (f"{self.owner}/{n}", None) for n in range(parallel)]
        self.slots.append((f"{self.owner}/stat", Priority.STAT))
        self._wakes = [threading.Event() for _ in self.slots]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # kept from job to job: volume buffers already mapped, and threads that make the
        # SEG while the model runs and store predictions while they are encoded
        self.buffers = VolumeBuffers(keep=len(self.slots))
        self._background = ThreadPoolExecutor(max_workers=2 * len(self.slots),
                                              thread_name_prefix="job-background")

    def start(self) -> None:
        if self.config.inference.preload:
            self.buffers.prime()  # the first study's volume costs no page faults
        for n, (owner, priority) in enumerate(self.slots):
            name = "inference-stat" if priority is Priority.STAT else f"inference-{n}"
            thread = threading.Thread(target=self._loop, args=(owner, priority, self._wakes[n]),
                                      name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        for wake in self._wakes:
            wake.set()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._background.shutdown(wait=True)

    def _loop(self, owner: str, max_priority: Priority | None, wake: threading.Event) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.queue.acquire(owner, self.config.inference.lease_seconds, limit=1,
                                          max_priority=max_priority)
            except Exception:
                LOG.exception("cannot acquire jobs; retrying")
                jobs = []
            if not jobs:
                wake.wait(1.0)
                wake.clear()
                continue
            self.run_job(jobs[0])

    def result_dir(self, job: Job) -> Path:
        return self.layout.result_dir(job.key)

    def run_job(self, job: Job) -> None:
        """Run one leased job to its end (done, retried later, or failed)."""
        from dicomnode.audit import events

        owner = job.lease_owner or self.owner
        payload = JobPayload.from_json(job.payload)
        LOG.info("job %s started: %s on series %s (attempt %d of %d)", job.id, job.model,
                 payload.series_uid, job.attempts, job.max_attempts)
        audit_job = (str(job.id), job.model, "", payload.study_uid, payload.series_uid)
        self.audit.record(events.job, "started", *audit_job)
        lease = self.config.inference.lease_seconds
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(lease / 3):
                if not self.queue.extend(job.id, owner, lease):
                    LOG.warning("job %s: lease lost while running", job.id)
                    return

        beat = threading.Thread(target=heartbeat, name=f"lease-{job.id}", daemon=True)
        beat.start()
        saved: Future[None] | None = None
        try:
            result, saved, seg_plan = self._infer(job, payload)
            result_set = self._deliver(job, result, seg_plan)
            if saved is not None:
                saved.result()  # the prediction is stored before the job is done
        except Exception as exc:
            done.set()
            if saved is not None:
                wait([saved])
            # the message may quote attribute values (validators do): redacted, and the
            # traceback logged without any message
            error = describe_exception(exc)
            LOG.error("job %s (%s) failed: %s\n%s", job.id, job.model, error,
                      traceback_text(exc))
            self.audit.record(events.job, "failed", *audit_job, error=f"{type(exc).__name__}")
            if self.metrics is not None:
                self.metrics.job_finished(job.model, "failed")
            try:
                released = self.queue.release(job.id, owner, error=error)
                LOG.warning("job %s is now %s after %d attempt(s)", job.id,
                            released.state.name.lower(), released.attempts)
            except Exception:
                LOG.exception("job %s: cannot record the failure", job.id)
            return
        done.set()
        if self.metrics is not None:
            self.metrics.job_finished(job.model, "done", result.seconds)
        self.audit.record(events.job, "finished", str(job.id), job.model, result.model_version,
                          payload.study_uid, payload.series_uid)
        record = result.to_json()
        record["objects"] = {k: list(v) for k, v in
                             (result_set.objects if result_set else {}).items()}
        try:
            self.queue.release(job.id, owner, result=record)
            LOG.info("job %s done: %s on series %s in %.2f s", job.id, job.model,
                     payload.series_uid, result.seconds)
        except Exception:
            LOG.exception("job %s: cannot record its result", job.id)

    def _source_paths(self, payload: JobPayload, sop_uids: tuple[str, ...]) -> list[Path]:
        rows = self.index.study_series(payload.study_uid).get(payload.series_uid) or []
        by_uid = {r.sop_instance_uid: r.path for r in rows}
        missing = [u for u in sop_uids if u not in by_uid]
        if missing:
            raise FileNotFoundError(f"{len(missing)} source instance(s) are no longer stored")
        return [self.layout.root / by_uid[u] for u in sop_uids]

    def _destinations(self, payload: JobPayload) -> list[Destination]:
        configured = {d.name: d for d in self.config.destinations}
        unknown = [n for n in payload.destinations if n not in configured]
        if unknown:
            raise ValueError(f"unknown destination(s) {', '.join(unknown)}")
        return [configured[n] for n in payload.destinations]

    def _replaces(self, job: Job, payload: JobPayload) -> dict[str, tuple[str, ...]]:
        """The result objects of the study's previous revision, which this job's replace."""
        previous_key = payload.key(job.model).previous()
        previous = self.index.result_set(previous_key) if previous_key is not None else None
        return dict(previous.objects) if previous is not None else {}

    def _plan_seg(self, job: Job, payload: JobPayload, volume: Any, model: Any
                  ) -> Future[SegPlan | None] | None:
        """Start making the job's SEG (all but its pixel data) while the model runs."""
        from dicomnode.encode.base import EncodeInput
        from dicomnode.encode.objects import kinds_for
        from dicomnode.encode.seg import plan_seg

        try:
            if "seg" not in kinds_for(self._destinations(payload), payload.keep):
                return None
            inp = EncodeInput(
                source_paths=tuple(self._source_paths(payload, tuple(volume.sop_instance_uids))),
                labels=np.zeros((0, 0, 0), dtype=np.uint8),  # not known yet, not needed
                manifest=model.manifest, measurements={}, study_uid=payload.study_uid,
                series_uid=payload.series_uid, revision=payload.revision,
                device=str(getattr(model, "device", self.pool.device)),
                replaces=self._replaces(job, payload))
        except Exception as exc:  # noqa: BLE001 - _deliver says what is wrong, if anything
            LOG.debug("job %s: the SEG is not made ahead (%s)", job.id, exc)
            return None
        return self._background.submit(plan_seg, inp)

    def _deliver(self, job: Job, result: InferenceResult,
                 seg_plan: Future[SegPlan | None] | None = None) -> ResultSet | None:
        """Encode the objects the job's destinations ask for, index them with the job's
        result set, and queue them for each destination."""
        from dicomnode.encode.objects import encode_objects, kinds_for
        from dicomnode.worker.results import encode_input

        payload = result.payload
        destinations = self._destinations(payload)
        kinds = kinds_for(destinations, payload.keep)
        if not kinds:
            return None
        manifest = self.pool.get(job.model).manifest
        sources = self._source_paths(payload, result.sop_instance_uids)
        replaces = self._replaces(job, payload)
        inp = encode_input(result, manifest, self.layout.root, sources, replaces)
        plan = None
        if seg_plan is not None:
            try:
                plan = seg_plan.result()
            except Exception:  # noqa: BLE001 - the SEG is then made from scratch
                LOG.exception("job %s: making the SEG ahead failed", job.id)
        objects = encode_objects(inp, kinds, self.result_dir(job) / "objects", plan)
        result_set = ResultSet(job.key, payload.study_uid,
                               {k: tuple(p.stem for p in v) for k, v in objects.items()},
                               replaces)
        self.index.record_results(result_set, [self._record(p) for paths in objects.values()
                                               for p in paths])
        if self.outbox is not None:
            queued: dict[str, set[str]] = {}
            for dest in destinations:
                files = [f for k in dest.objects for f in objects.get(k, [])]
                self.outbox.enqueue(dest.name, files, key=job.key)
                queued[dest.name] = {f.stem for f in files}
                LOG.info("job %s: %d object(s) queued for %s", job.id, len(files), dest.name)
            if replaces:
                self._withdraw_replaced(job, result_set, queued, manifest)
            if self._on_enqueued is not None:
                self._on_enqueued()
        return result_set

    def _withdraw_replaced(self, job: Job, result_set: ResultSet,
                           queued: dict[str, set[str]], manifest: Any) -> None:
        """IHE IOCM: each destination that received what this revision replaces gets a
        rejection note, sent after the new results (see :mod:`dicomnode.withdrawal`).
        Idempotent, so a re-run of the job changes nothing."""
        from dicomnode.encode.kos import ModelIdentity
        from dicomnode.withdrawal import WithdrawalError, withdraw

        assert self.outbox is not None
        if self.withdrawals is None:
            return
        replaced = {uid for uids in result_set.replaces.values() for uid in uids}
        try:
            report = withdraw(
                storage=self.layout.root, outbox=self.outbox, index=self.index,
                gate=self.withdrawals, study_uid=result_set.study_uid,
                reason=f"replaced by revision {JobPayload.from_json(job.payload).revision}"
                       f" of {job.model}",
                replaced=replaced, after=queued,
                identity=ModelIdentity(manifest.name, manifest.version), audit=self.audit)
        except WithdrawalError as exc:
            LOG.warning("job %s: the replaced results cannot be withdrawn: %s", job.id, exc)
            return
        if report.notes:
            LOG.info("job %s: %d rejection note(s) for the replaced results", job.id,
                     len(report.notes))

    def _record(self, path: Path) -> InstanceRecord:
        """The index entry of a result object the node wrote."""
        from pydicom import dcmread

        from dicomnode.core.attributes import InstanceAttributes

        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        return InstanceRecord(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax=str(meta.TransferSyntaxUID), calling_ae=self.config.ae_title,
            size=path.stat().st_size, received_at=time.time(),
            path=self.layout.relative(path), called_ae=self.config.ae_title,
            origin="result", attributes=InstanceAttributes.from_dataset(ds),
        )

    def _infer(self, job: Job, payload: JobPayload
               ) -> tuple[InferenceResult, Future[None] | None, Future[SegPlan | None] | None]:
        """Load the series, run the model; the SEG is made (all but its pixel data) while
        the model runs, and the prediction is stored (``labels.npz``, then
        ``prediction.json``) while the caller encodes it. Returns the result and the two
        futures (None when an earlier attempt stored the prediction already)."""
        from dicomnode.inference.volume import load_series

        out_dir = self.result_dir(job)
        meta_path = out_dir / "prediction.json"
        if meta_path.is_file():  # a previous attempt finished but died before release
            return InferenceResult.from_json(json.loads(meta_path.read_text())), None, None
        rows = self.index.study_series(payload.study_uid).get(payload.series_uid)
        if not rows:
            raise FileNotFoundError(f"series {payload.series_uid} is not in the index")
        started = time.perf_counter()
        stat = job.priority is Priority.STAT
        with self.scheduler.stat(str(job.id)) if stat else contextlib.nullcontext():
            volume = load_series([self.layout.root / r.path for r in rows],
                                 allocate=self.buffers.take)
            seg_plan: Future[SegPlan | None] | None = None
            try:
                model = self.pool.get(job.model)
                seg_plan = self._plan_seg(job, payload, volume, model)
                prediction = self.scheduler.predict(str(job.id), job.model, model, volume,
                                                    job.priority)
            finally:
                self.buffers.give_back(volume.array)  # the model is done with it
        seconds = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        labels_path = out_dir / "labels.npz"
        result = InferenceResult(
            job_key=job.key,
            model=prediction.model_name or job.model,
            model_version=prediction.model_version,
            device=prediction.device,
            payload=payload,
            sop_instance_uids=tuple(volume.sop_instance_uids),
            shape=tuple(int(n) for n in prediction.labels.shape),  # type: ignore[arg-type]
            labels_path=self.layout.relative(labels_path),
            measurements={k: dict(q) for k, q in prediction.measurements.items()},
            seconds=seconds,
            model_seconds=prediction.seconds,
            labels=prediction.labels,  # handed to the encoder as is
        )

        def store() -> None:  # zlib releases the GIL: this overlaps the encoding
            atomic_write(labels_path, _npz_bytes(prediction.labels))
            atomic_write(meta_path, json.dumps(result.to_json(), indent=1).encode())

        return result, self._background.submit(store), seg_plan


def _npz_bytes(labels: np.ndarray) -> bytes:
    """``labels`` as an .npz (np.load reads it) deflated at level 1: label maps are
    mostly zeros, so the fast level already shrinks them ~50x, at a fraction of the
    time of numpy's default level."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open("labels.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.uint8))
    return buf.getvalue()
