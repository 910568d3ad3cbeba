"""The node's side of a remote worker's job: claim, input, lease, prediction, delivery.

A worker learns a job's id from the broker and does everything else through the node's
worker API (``dicomnode/web/worker_api.py``), which calls :class:`RemoteJobs`:

1. **claim** -- the job is leased to the worker (:meth:`CeleryJobQueue.claim`); a stale or
   duplicated message gets 409 and is dropped; a job whose study is no longer stored
   fails for good with that reason (410). If an earlier attempt's prediction is already
   stored (its delivery failed), the node finishes it on the spot: no model runs again.
2. **input** -- the series is loaded (``load_series``) and sent as the de-identified
   volume of :mod:`dicomnode.worker.wire`; the opaque slice keys and the shape are kept in
   the job's result folder (``remote-input.json``); each fetch is audited.
3. **extend** -- the worker's lease heartbeat.
4. **result** -- the label map and measurements are checked against the job (shape, slice
   keys), the manifest (label values, measurement names, model name and version) and
   stored once per job (``labels.npz`` + ``prediction.json``, the in-process worker's
   files, so that retention, status and re-delivery treat both alike); then the node
   encodes, checks, delivers and audits as for an in-process job, and releases the job.
   A result that arrives again (a retried upload, a second worker after a lease loss)
   finds the job done and changes nothing: one result set per job revision.

Everything that depends on the in-process pipeline's current shape (the job payload
dict, the prediction dict, ``InferenceWorker._deliver``) is in :class:`_Pipeline` and
:func:`_prediction_record` below, so that the typed job records can replace them in one
place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index
from dicomnode.core.manifest import Manifest, load_manifest
from dicomnode.core.records import InferenceResult, JobPayload
from dicomnode.errors import DicomNodeError, InconsistentSeriesError
from dicomnode.queue.base import Job, JobState, LeaseLostError
from dicomnode.queue.celery import CeleryJobQueue
from dicomnode.worker import wire
from dicomnode.worker.checks import (
    Expected,
    check_labels,
    list_field,
    model_name_field,
    number_field,
    optional_int,
    plain_value,
    text_field,
)
from dicomnode.worker.registry import WorkerRegistry

LOG = logging.getLogger(__name__)

SECRET_FILENAME = ".worker-secret"
INPUT_RECORD = "remote-input.json"


class RemoteJobError(DicomNodeError):
    """A worker's request that cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str, state: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.state = state


def _atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_secret(storage: Path) -> bytes:
    """The node's secret for opaque slice keys (created on first use, mode 0600)."""
    path = Path(storage) / SECRET_FILENAME
    if not path.exists():
        _atomic_write(path, secrets.token_bytes(32), 0o600)
    data = path.read_bytes()
    if len(data) < 16:
        raise DicomNodeError(f"{path}: the worker key secret is damaged (too short)")
    return data


# -- the coupling to the in-process pipeline (switch here to the typed records) -----------


class _ManifestPool:
    """What ``InferenceWorker._deliver`` needs of a ModelPool: the manifest, no weights."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._cache: dict[str, Manifest] = {}
        self._lock = threading.Lock()

    def manifest(self, name: str) -> Manifest:
        with self._lock:
            m = self._cache.get(name)
            if m is None:
                folder = self.models_dir / name
                if not (folder / "manifest.yaml").is_file():
                    raise FileNotFoundError(f"model {name!r}: no manifest at {folder}")
                m = self._cache[name] = load_manifest(folder)
            return m

    def get(self, name: str) -> Any:
        return SimpleNamespace(manifest=self.manifest(name))


class _Pipeline:
    """The node's in-process result path (:class:`~dicomnode.worker.inference.InferenceWorker`
    ``._deliver``: encode, check, index, queue, withdraw what a revision replaces), used for
    the results workers hand back."""

    def __init__(self, config: NodeConfig, index: Index, queue: CeleryJobQueue,
                 pool: _ManifestPool, outbox: Any, on_enqueued: Callable[[], None] | None,
                 audit: Audit, metrics: Any, withdrawals: Any = None) -> None:
        from dicomnode.worker.inference import InferenceWorker

        self._worker = InferenceWorker(config, index, queue, pool,  # type: ignore[arg-type]
                                       owner="node-handback",
                                       outbox=outbox, on_enqueued=on_enqueued, audit=audit,
                                       metrics=metrics, withdrawals=withdrawals)

    def result_dir(self, job: Job) -> Path:
        return self._worker.result_dir(job)

    def deliver(self, job: Job, record: dict[str, Any], labels: np.ndarray | None
                ) -> dict[str, list[str]]:
        """Encode and queue the objects of a stored result; their UIDs per kind."""
        result = InferenceResult.from_json(record)
        if labels is not None:
            result = dataclasses.replace(result, labels=labels)
        result_set = self._worker._deliver(job, result)
        return {k: list(v) for k, v in (result_set.objects if result_set else {}).items()}


def _study_series(job: Job) -> tuple[str, str]:
    payload = JobPayload.from_json(job.payload)
    return payload.study_uid, payload.series_uid


def _prediction_record(job: Job, storage: Path, labels_path: Path, expected: Expected,
                       header: dict[str, Any], worker: str) -> dict[str, Any]:
    """The prediction as the in-process worker records it (``prediction.json``: an
    :class:`~dicomnode.core.records.InferenceResult`), and which worker made it."""
    result = InferenceResult(
        job_key=job.key, model=str(header["model"]),
        model_version=str(header["model_version"]), device=str(header["device"]),
        payload=JobPayload.from_json(job.payload),
        sop_instance_uids=tuple(expected.sop_instance_uids),
        shape=tuple(int(n) for n in expected.shape),  # type: ignore[arg-type]
        labels_path=str(labels_path.relative_to(storage)),
        measurements={str(k): {str(q): (float(v[0]), str(v[1])) for q, v in m.items()}
                      for k, m in dict(header["measurements"]).items()},
        seconds=float(header["seconds"]), model_seconds=float(header["seconds"]))
    return {**result.to_json(), "worker": worker}


# -- the service -----------------------------------------------------------------------------


class RemoteJobs:
    """What the worker API does, in the node (thread-safe)."""

    def __init__(self, config: NodeConfig, index: Index, queue: CeleryJobQueue,
                 registry: WorkerRegistry, *, outbox: Any = None,
                 on_enqueued: Callable[[], None] | None = None, audit: Audit | None = None,
                 metrics: Any = None, withdrawals: Any = None) -> None:
        self.config = config
        self.index = index
        self.queue = queue
        self.registry = registry
        self.audit: Audit = audit or NullAudit()
        self.metrics = metrics
        self.storage = Path(config.storage)
        self.lease_seconds = float(config.inference.lease_seconds)
        self.pool = _ManifestPool(config.models_dir)
        self.pipeline = _Pipeline(config, index, queue, self.pool, outbox, on_enqueued,
                                  self.audit, metrics, withdrawals)
        self._secret = load_secret(self.storage)
        self._locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _job_lock(self, job_id: int) -> threading.Lock:
        with self._locks_lock:
            if len(self._locks) > 10000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(job_id, threading.Lock())

    # -- heartbeats --------------------------------------------------------------------

    def heartbeat(self, beat: dict[str, Any], address: str) -> dict[str, Any]:
        try:
            info = self.registry.beat(
                name=text_field(beat, "name", 64), owner=text_field(beat, "owner", 200),
                host=text_field(beat, "host", 255), address=address,
                models=[model_name_field(m) for m in list_field(beat, "models")],
                device=text_field(beat, "device", 64), version=text_field(beat, "version", 32),
                state=text_field(beat, "state", 16), job_id=optional_int(beat.get("job_id")),
                interval=number_field(beat, "interval"), started_at=number_field(beat, "started_at"),
                jobs_done=int(number_field(beat, "jobs_done")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteJobError(400, f"invalid heartbeat: {exc}") from None
        manifests: dict[str, str | None] = {}
        for name in info.models:
            try:
                manifests[name] = self.pool.manifest(name).version
            except Exception:  # the node has no manifest for it: its jobs cannot be encoded
                manifests[name] = None
        return {"node": self.config.ae_title, "lease_seconds": self.lease_seconds,
                "worker": info.name, "manifests": manifests}

    # -- claim / extend / fail ---------------------------------------------------------------

    def _get(self, job_id: int) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise RemoteJobError(404, f"no job {job_id} on this node")
        return job

    def _gone_reason(self, job: Job) -> str | None:
        """Why the job's series can no longer be read, or None while it is stored."""
        study_uid, series_uid = _study_series(job)
        if self.index.study_series(study_uid).get(series_uid):
            return None
        from dicomnode.core.purges import PurgeLedger

        when = ""
        purged_at = PurgeLedger(self.index).purged_at(study_uid)
        if purged_at is not None:
            when = time.strftime(" on %Y-%m-%d %H:%M UTC", time.gmtime(purged_at))
        return (f"the study of job {job.id} is no longer stored on this node (purged{when});"
                " the job cannot run")

    def _fail_gone(self, job: Job, owner: str, reason: str) -> RemoteJobError:
        from dicomnode.audit import events

        if job.state is JobState.PENDING:
            leased, now = self.queue.claim(job.id, owner, self.lease_seconds)
            if leased is None:  # backing off: it fails at its next hand-off
                assert now is not None
                return RemoteJobError(409, _not_runnable(now), now.state.value)
        try:
            failed = self.queue.fail(job.id, owner, reason)
        except LeaseLostError as exc:
            return RemoteJobError(409, f"job {job.id}: {exc}", exc.state.value)
        study_uid, series_uid = _study_series(job)
        self.audit.record(events.job, "failed", str(job.id), job.model, "", study_uid,
                          series_uid, error="study no longer stored")
        if self.metrics is not None:
            self.metrics.job_finished(job.model, "failed")
        return RemoteJobError(410, reason, failed.state.value)

    def claim(self, job_id: int, owner: str, worker: str) -> dict[str, Any]:
        """Lease ``job_id`` to ``owner`` (see the module docstring)."""
        from dicomnode.audit import events

        job = self._get(job_id)
        if job.state is JobState.PENDING or (job.state is JobState.LEASED
                                             and job.lease_owner == owner):
            gone = self._gone_reason(job)
            if gone is not None:
                raise self._fail_gone(job, owner, gone)
        leased: Job | None = job  # LEASED to owner: it asks again (its first answer was lost)
        if not (job.state is JobState.LEASED and job.lease_owner == owner):
            leased, now = self.queue.claim(job_id, owner, self.lease_seconds)
            if leased is None:
                assert now is not None
                raise RemoteJobError(409, _not_runnable(now), now.state.value)
            study_uid, series_uid = _study_series(leased)
            self.audit.record(events.job, "started", str(job_id), leased.model, "", study_uid,
                              series_uid)
        assert leased is not None
        stored = self.pipeline.result_dir(leased) / "prediction.json"
        if stored.is_file():  # an earlier attempt's prediction: deliver it, run nothing
            LOG.info("job %d: prediction already stored; finishing it without a model run",
                     job_id)
            record = json.loads(stored.read_text())
            outcome = self._finish(leased, owner, record, None)
            return {"job": job_id, "finished": outcome["state"], **outcome}
        LOG.info("job %d (%s) claimed by worker %s, attempt %d of %d", job_id, leased.model,
                 worker, leased.attempts, leased.max_attempts)
        return {"job": job_id, "model": leased.model, "lease_seconds": self.lease_seconds,
                "attempt": leased.attempts, "max_attempts": leased.max_attempts}

    def extend(self, job_id: int, owner: str) -> dict[str, Any]:
        self._get(job_id)
        if not self.queue.extend(job_id, owner, self.lease_seconds):
            job = self._get(job_id)
            raise RemoteJobError(409, f"job {job_id}: the lease is lost ({_not_runnable(job)})",
                                 job.state.value)
        return {"job": job_id, "lease_seconds": self.lease_seconds}

    def fail(self, job_id: int, owner: str, error: str) -> dict[str, Any]:
        """The worker could not run the model: the job backs off or fails (as in-process)."""
        from dicomnode.audit import events

        job = self._get(job_id)
        message = str(error)[:2000] or "the worker reported an error"
        try:
            after = self.queue.release(job_id, owner, error=message)
        except LeaseLostError as exc:
            raise RemoteJobError(409, f"job {job_id}: {exc}", exc.state.value) from None
        study_uid, series_uid = _study_series(job)
        self.audit.record(events.job, "failed", str(job_id), job.model, "", study_uid,
                          series_uid, error=message.split(":", 1)[0][:64])
        if self.metrics is not None:
            self.metrics.job_finished(job.model, "failed")
        return {"job": job_id, "state": after.state.value, "attempts": after.attempts}

    # -- input ---------------------------------------------------------------------------

    def _held(self, job_id: int, owner: str) -> Job:
        job = self._get(job_id)
        if job.state is not JobState.LEASED or job.lease_owner != owner:
            raise RemoteJobError(409, f"job {job_id}: not leased to this worker"
                                 f" ({_not_runnable(job)})", job.state.value)
        return job

    def input(self, job_id: int, owner: str, worker: str,
              address: str) -> tuple[dict[str, Any], np.ndarray]:
        """The de-identified volume of a job leased to ``owner`` (header, array)."""
        from dicomnode.audit import worker_events
        from dicomnode.inference.volume import load_series

        job = self._held(job_id, owner)
        gone = self._gone_reason(job)
        if gone is not None:
            raise self._fail_gone(job, owner, gone)
        study_uid, series_uid = _study_series(job)
        rows = self.index.study_series(study_uid)[series_uid]
        manifest = self.pool.manifest(job.model)
        try:
            volume = load_series([self.storage / r.path for r in rows])
        except InconsistentSeriesError as exc:  # it never will be: no retry
            from dicomnode.audit import events

            reason = f"the series cannot be loaded as one volume: {exc}"
            self.queue.fail(job_id, owner, reason)
            self.audit.record(worker_events.volume_sent, worker, address, study_uid,
                              str(job_id), job.model, 0, False, "series not loadable")
            self.audit.record(events.job, "failed", str(job_id), job.model, "", study_uid,
                              series_uid, error="InconsistentSeriesError")
            if self.metrics is not None:
                self.metrics.job_finished(job.model, "failed")
            raise RemoteJobError(422, reason, "failed") from None
        keys = [wire.slice_key(self._secret, job.key, uid) for uid in volume.sop_instance_uids]
        attributes = self._attributes(manifest, rows, volume)
        header = wire.volume_header(volume, job_id=job_id, model=job.model, slice_keys=keys,
                                    attributes=attributes)
        array = wire.volume_array(volume)
        folder = self.pipeline.result_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / INPUT_RECORD, json.dumps({
            "job": job_id, "shape": list(volume.shape),
            "sop_instance_uids": list(volume.sop_instance_uids), "slice_keys": keys,
            "fetched_by": owner, "fetched_at": time.time(),
        }).encode())
        self.audit.record(worker_events.volume_sent, worker, address, study_uid, str(job_id),
                          job.model, int(volume.shape[0]))
        LOG.info("job %d: volume %s (%s) sent to worker %s", job_id,
                 "x".join(map(str, volume.shape)), array.dtype, worker)
        return header, array

    def _attributes(self, manifest: Manifest, rows: list[Any], volume: Any) -> dict[str, Any]:
        """The manifest's declared attributes, from the first slice (each checked again)."""
        if not manifest.attributes:
            return {}
        from pydicom import dcmread

        from dicomnode.core.phi import check_shareable

        first_uid = volume.sop_instance_uids[0]
        path = next(self.storage / r.path for r in rows if r.sop_instance_uid == first_uid)
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(manifest.attributes))
        out: dict[str, Any] = {}
        for keyword in manifest.attributes:
            check_shareable(keyword)
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                out[keyword] = [plain_value(v) for v in value]
            else:
                out[keyword] = plain_value(value)
        return out

    # -- result ----------------------------------------------------------------------------

    def begin_result(self, job_id: int, owner: str) -> Expected | dict[str, Any]:
        """Before a result is read: what it must look like, or the answer when the job is
        already done (a repeated upload)."""
        job = self._get(job_id)
        if job.state is JobState.DONE:
            return {"job": job_id, "state": "done", "already": True,
                    "objects": (job.result or {}).get("objects", {})}
        if job.state is JobState.FAILED:
            raise RemoteJobError(409, f"job {job_id} has failed: {job.last_error}", "failed")
        if job.state is JobState.LEASED and job.lease_owner != owner:
            raise RemoteJobError(409, f"job {job_id} is leased to another worker now; this"
                                 " result is not needed", "leased")
        record = self.pipeline.result_dir(job) / INPUT_RECORD
        if not record.is_file():
            raise RemoteJobError(409, f"job {job_id}: no input was sent for it", job.state.value)
        data = json.loads(record.read_text())
        shape = tuple(int(n) for n in data["shape"])
        return Expected(job, (shape[0], shape[1], shape[2]), tuple(data["sop_instance_uids"]),
                        tuple(data["slice_keys"]))

    def finish_result(self, expected: Expected, owner: str, worker: str,
                      header: dict[str, Any], labels: np.ndarray,
                      read_seconds: float = 0.0) -> dict[str, Any]:
        """Check, store once, deliver and release (see the module docstring)."""
        job_id = expected.job.id
        started = time.perf_counter()
        with self._job_lock(job_id):
            job = self._get(job_id)
            if job.state is JobState.DONE:
                return {"job": job_id, "state": "done", "already": True,
                        "objects": (job.result or {}).get("objects", {})}
            if job.state is JobState.PENDING:  # the lease ran out meanwhile: take it back
                leased, now = self.queue.claim(job_id, owner, self.lease_seconds)
                if leased is None:
                    assert now is not None
                    raise RemoteJobError(409, _not_runnable(now), now.state.value)
                job = leased
            elif job.state is not JobState.LEASED or job.lease_owner != owner:
                raise RemoteJobError(409, f"job {job_id}: not leased to this worker"
                                     f" ({_not_runnable(job)})", job.state.value)
            manifest = self.pool.manifest(job.model)
            try:
                ordered = check_labels(header, labels, expected, manifest)
            except wire.WireError as exc:
                reason = f"invalid result from worker {worker}: {exc}"
                LOG.error("job %d: %s", job_id, reason)
                self.fail(job_id, owner, reason)
                raise RemoteJobError(422, reason) from None
            folder = self.pipeline.result_dir(job)
            meta_path = folder / "prediction.json"
            if meta_path.is_file():  # stored by an earlier upload: keep the first
                record = json.loads(meta_path.read_text())
                held: np.ndarray | None = None
            else:
                from dicomnode.worker.inference import _npz_bytes

                labels_path = folder / "labels.npz"
                _atomic_write(labels_path, _npz_bytes(ordered))
                record = _prediction_record(job, self.storage, labels_path, expected, header,
                                            worker)
                _atomic_write(meta_path, json.dumps(record, indent=1).encode())
                held = ordered
            timings = f"result read in {read_seconds:.2f} s, checked and stored in" \
                f" {time.perf_counter() - started:.2f} s"
            outcome = self._finish(job, owner, record, held, timings)
            if outcome["state"] == "done":
                self.registry.handed_back(worker)
            return outcome

    def _finish(self, job: Job, owner: str, record: dict[str, Any],
                labels: np.ndarray | None, timings: str = "") -> dict[str, Any]:
        """Encode, check and queue the objects for delivery; release the job."""
        from dicomnode.audit import events

        study_uid, series_uid = _study_series(job)
        result = dict(record)
        started = time.perf_counter()
        try:
            result["objects"] = self.pipeline.deliver(job, result, labels)
        except Exception as exc:
            LOG.exception("job %d: delivering its result failed", job.id)
            self.audit.record(events.job, "failed", str(job.id), job.model,
                              str(record.get("model_version", "")), study_uid, series_uid,
                              error=type(exc).__name__)
            if self.metrics is not None:
                self.metrics.job_finished(job.model, "failed")
            after = self.queue.release(job.id, owner, error=f"{type(exc).__name__}: {exc}")
            return {"job": job.id, "state": after.state.value,
                    "error": f"the node could not deliver the result: {type(exc).__name__}"}
        if self.metrics is not None:
            self.metrics.job_finished(job.model, "done", float(record.get("seconds", 0.0)))
        self.audit.record(events.job, "finished", str(job.id), job.model,
                          str(record.get("model_version", "")), study_uid, series_uid)
        try:
            self.queue.release(job.id, owner, result=result)
        except LeaseLostError:
            LOG.exception("job %d: its lease was lost while the result was delivered", job.id)
        LOG.info("job %d done by worker %s: %s (%sencoded and queued in %.2f s)", job.id,
                 record.get("worker", "?"),
                 ", ".join(f"{k} {len(v)}" for k, v in result["objects"].items()) or "no objects",
                 f"{timings}, " if timings else "", time.perf_counter() - started)
        return {"job": job.id, "state": "done", "objects": result["objects"]}


def _not_runnable(job: Job) -> str:
    if job.state is JobState.LEASED:
        return f"job {job.id} is running on another worker"
    if job.state is JobState.DONE:
        return f"job {job.id} is already done"
    if job.state is JobState.FAILED:
        return f"job {job.id} has failed: {job.last_error}"
    return f"job {job.id} waits until {time.strftime('%H:%M:%S', time.localtime(job.not_before))}"
