"""Sharing one device between jobs: admission by memory, STAT preemption, OOM retries.

Several models stay resident on one GPU and several jobs may run on it at once (the
worker has a slot per routine job in flight plus one kept for STAT jobs). This module
decides when a job's ``predict`` may start and what happens when the GPU says no:

* **Profiles.** At start-up each model runs once on a real-sized dummy volume (300
  slices of 512 x 512 by default) and its peak memory is measured
  (``torch.cuda.max_memory_allocated`` above what was allocated before). A job's
  estimate is that peak, scaled up for a larger volume. This also warms the model
  (CUDA kernels, cuDNN plans) before the first study.
* **Admission.** A job starts when nothing else runs on the device, or when its estimate
  (plus ``headroom``) fits what is available: ``torch.cuda.mem_get_info``'s free memory,
  plus what torch's caching allocator holds beyond the resident models, minus the
  estimates of the jobs already running. A model whose peak is unknown runs alone.
  Waiting STAT jobs are admitted before waiting routine ones.
* **Out of memory.** ``torch.cuda.OutOfMemoryError`` in a job does not fail it: the
  cache is emptied and the job runs again with its sliding-window batch halved (down to
  1); at batch 1 (or for a whole-volume network) it waits until another job on the
  device finishes and tries again. Only a job alone on the device that still runs out
  of memory at batch 1, i.e. one that can never fit, fails, with
  :class:`DeviceMemoryError` saying so (the queue retries it later).
* **STAT preemption.** While a STAT job is in progress (from loading its series to the
  end of its inference), routine jobs do not start, and running routine jobs pause at
  their next window batch (:func:`dicomnode.inference.execution.guard` calls
  :meth:`GpuScheduler._checkpoint`) and resume where they stopped when it is done. A
  paused job keeps its GPU memory; a STAT job that cannot fit beside paused jobs lets
  them finish first instead of dead-locking.

On the CPU the same code runs with no memory figures: admission is by the rules above
without the memory test, and preemption works the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.errors import DicomNodeError
from dicomnode.inference import execution
from dicomnode.queue.base import Priority

LOG = logging.getLogger(__name__)

#: The dummy volume a model's peak memory is measured on (slices, rows, columns).
PROFILE_SHAPE = (300, 512, 512)


class DeviceMemoryError(DicomNodeError):
    """A job does not fit on its device even alone and with the smallest batch."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Is ``exc`` the device running out of memory (torch's error, or the older
    RuntimeError text, or cuDNN/cuBLAS failing to allocate)?"""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "CUDNN_STATUS_ALLOC_FAILED" in text
        or "CUBLAS_STATUS_ALLOC_FAILED" in text)


class DeviceMemory:
    """Memory figures of the device (``torch.cuda`` on CUDA; nothing on the CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")

    def _index(self) -> Any:
        import torch

        return torch.device(self.device)

    def free(self) -> int:
        """Free device memory now (every process), bytes."""
        import torch

        return int(torch.cuda.mem_get_info(self._index())[0])

    def total(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self._index())[1])

    def reserved(self) -> int:
        """Held by torch's caching allocator in this process (allocated or cached)."""
        import torch

        return int(torch.cuda.memory_reserved(self._index()))

    def allocated(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated(self._index()))

    def reset_peak(self) -> None:
        import torch

        torch.cuda.synchronize(self._index())
        torch.cuda.reset_peak_memory_stats(self._index())

    def peak(self) -> int:
        import torch

        torch.cuda.synchronize(self._index())
        return int(torch.cuda.max_memory_allocated(self._index()))

    def release_cache(self) -> None:
        """Give torch's cached blocks back (after an out-of-memory error)."""
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class ModelProfile:
    """A model's peak device memory for one job, measured at warm-up."""

    name: str
    peak_bytes: int | None  # None: not measured (runs alone on a GPU)
    voxels: int  # of the volume it was measured on
    seconds: float = 0.0

    def estimate(self, voxels: int) -> int | None:
        """The peak for a volume of ``voxels``: the measured one, scaled up linearly
        for a larger volume (sliding-window outputs grow with the volume)."""
        if self.peak_bytes is None:
            return None
        return int(self.peak_bytes * max(1.0, voxels / max(1, self.voxels)))


@dataclass(eq=False)
class _Ticket:
    job: str
    model: str
    stat: bool
    estimate: int | None
    paused: bool = False


@dataclass
class SchedulerStats:
    """Counters, for tests and logs."""

    admitted: int = 0
    pauses: int = 0
    oom_retries: int = 0
    batch_halvings: int = 0
    waits_for_memory: int = 0
    paused_jobs: list[str] = field(default_factory=list)


class GpuScheduler:
    """Admission, preemption and out-of-memory retries on one device (thread-safe)."""

    def __init__(self, device: str, *, headroom: float = 0.15, max_oom_retries: int = 12,
                 wait_s: float = 60.0, memory: DeviceMemory | None = None) -> None:
        if headroom < 0:
            raise ValueError(f"headroom: must be >= 0, got {headroom}")
        if max_oom_retries < 0:
            raise ValueError(f"max_oom_retries: must be >= 0, got {max_oom_retries}")
        self.device = device
        self.memory = memory or DeviceMemory(device)
        self.headroom = float(headroom)
        self.max_oom_retries = max_oom_retries
        self.wait_s = float(wait_s)
        self.profiles: dict[str, ModelProfile] = {}
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._running: list[_Ticket] = []
        self._finished = 0  # jobs that left the device, ever
        self._stat_active = 0  # STAT jobs in progress (stat())
        self._stat_yielding = 0  # of which: waiting for paused jobs to finish (OOM)
        self._baseline = 0  # device memory allocated when no job runs (resident models)
        if self.memory.cuda:
            self._baseline = self.memory.allocated()

    # -- profiles --------------------------------------------------------------------

    def profile(self, name: str, runtime: Any, shape: tuple[int, int, int] = PROFILE_SHAPE
                ) -> ModelProfile:
        """Measure ``runtime``'s peak device memory on a dummy volume of ``shape``.

        On the CPU nothing is measured. A model that fails on the dummy volume is
        logged and left unmeasured (it then runs alone on the GPU)."""
        voxels = int(np.prod(shape))
        if not self.memory.cuda:
            prof = ModelProfile(name, None, voxels)
            self.profiles[name] = prof
            return prof
        started = time.perf_counter()
        volume = dummy_volume(shape)
        with self._cond:  # nothing else runs while a model is measured
            self._cond.wait_for(lambda: not self._running)
            before = self.memory.allocated()
            self.memory.reset_peak()
            try:
                with execution.running(execution.Execution()):
                    runtime.predict(volume)
                peak: int | None = max(0, self.memory.peak() - before)
            except Exception as exc:  # noqa: BLE001 - a model may refuse a dummy volume
                LOG.warning("model %s: peak memory not measured (%s: %s); it runs alone",
                            name, type(exc).__name__, exc)
                peak = None
            del volume
            self.memory.release_cache()
            self._baseline = self.memory.allocated()
        prof = ModelProfile(name, peak, voxels, time.perf_counter() - started)
        self.profiles[name] = prof
        if peak is not None:
            LOG.info("model %s: peak %.0f MB on a %s volume (warm-up %.2f s, %.0f MB free)",
                     name, peak / 1e6, "x".join(map(str, shape)), prof.seconds,
                     self.memory.free() / 1e6)
        return prof

    # -- STAT --------------------------------------------------------------------------

    @contextlib.contextmanager
    def stat(self, job: str) -> Iterator[None]:
        """A STAT job is in progress: routine jobs pause at their next window batch and
        none starts until it is over."""
        with self._cond:
            self._stat_active += 1
            self._cond.notify_all()
        LOG.info("STAT job %s in progress: routine inference yields", job)
        try:
            yield
        finally:
            with self._cond:
                self._stat_active -= 1
                self._cond.notify_all()

    def _preempting(self) -> bool:
        return self._stat_active > self._stat_yielding

    def _checkpoint(self, ticket: _Ticket) -> None:
        """Before each window batch of ``ticket``'s job: a routine job waits here while a
        STAT job is in progress."""
        if ticket.stat:
            return
        with self._cond:
            if not self._preempting():
                return
            ticket.paused = True
            self.stats.pauses += 1
            self.stats.paused_jobs.append(ticket.job)
            self._cond.notify_all()
            LOG.info("job %s (%s) paused for a STAT job", ticket.job, ticket.model)
            started = time.perf_counter()
            self._cond.wait_for(lambda: not self._preempting())
            ticket.paused = False
        LOG.info("job %s (%s) resumed after %.2f s", ticket.job, ticket.model,
                 time.perf_counter() - started)

    # -- admission ---------------------------------------------------------------------

    def _available(self) -> int:
        """Device memory a new job may use: free, plus cached by torch beyond the
        resident models, minus what running jobs were admitted with."""
        committed = sum(t.estimate or 0 for t in self._running)
        return (self.memory.free() + self.memory.reserved() - self._baseline - committed)

    def _may_start(self, ticket: _Ticket) -> bool:
        if not ticket.stat and (self._preempting()
                                or any(t.stat for t in self._waiting)):
            return False  # STAT first
        if not self._running:
            return True
        if not self.memory.cuda:
            return True
        if ticket.estimate is None or any(t.estimate is None for t in self._running):
            return False  # unknown peak: alone
        if ticket.estimate * (1 + self.headroom) <= self._available():
            return True
        # a STAT job beside routine jobs it paused: try (an OOM then lets them finish)
        return ticket.stat and all(t.paused for t in self._running)

    def _admit(self, ticket: _Ticket) -> None:
        with self._cond:
            self._waiting.append(ticket)
            try:
                waited = False
                while not self._may_start(ticket):
                    waited = True
                    self._cond.wait(1.0)  # re-check now and then: other processes free memory
                if waited:
                    LOG.info("job %s admitted after waiting for the device", ticket.job)
            finally:
                self._waiting.remove(ticket)
            self._running.append(ticket)
            self.stats.admitted += 1

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            self._running.remove(ticket)
            self._finished += 1
            if not self._running and self.memory.cuda:
                self._baseline = self.memory.allocated()
            self._cond.notify_all()

    # -- running -----------------------------------------------------------------------

    def predict(self, job: str, model: str, runtime: Any, volume: Any,
                priority: Priority | int | str = Priority.ROUTINE) -> Any:
        """``runtime.predict(volume)`` once admitted; out-of-memory errors are retried
        with a smaller window batch, then after another job finishes."""
        stat = Priority.parse(priority) is Priority.STAT
        voxels = int(np.prod(getattr(volume, "shape", (0,))))
        profile = self.profiles.get(model)
        estimate = profile.estimate(voxels) if profile is not None else None
        ticket = _Ticket(job, model, stat, estimate)
        batch: int | None = None
        retries = 0
        while True:
            self._admit(ticket)
            ex = execution.Execution(sw_batch_size=batch,
                                     checkpoint=lambda: self._checkpoint(ticket))
            alone, finished = False, 0
            try:
                with execution.running(ex):
                    return runtime.predict(volume)
            except Exception as exc:
                if not is_out_of_memory(exc) or retries >= self.max_oom_retries:
                    raise
                with self._cond:
                    alone = len(self._running) == 1
                    finished = self._finished + 1  # counting its own leaving, just below
            finally:
                self._leave(ticket)
            # out of memory: the failed attempt's tensors are gone with its frames
            retries += 1
            self.stats.oom_retries += 1
            self.memory.release_cache()
            used = ex.used_batch
            if used is not None and used > 1:
                batch = max(1, used // 2)
                self.stats.batch_halvings += 1
                LOG.warning("job %s (%s): out of device memory with %d windows per batch; "
                            "again with %d", job, model, used, batch)
                continue
            if alone:
                raise DeviceMemoryError(
                    f"job {job} ({model}): out of device memory alone on {self.device} "
                    f"with the smallest batch; the volume does not fit") from None
            self.stats.waits_for_memory += 1
            LOG.warning("job %s (%s): out of device memory beside other jobs; runs again "
                        "when one of them is done", job, model)
            self._wait_for_a_finish(finished, stat)

    def _wait_for_a_finish(self, finished: int, stat: bool) -> None:
        """Wait until another job leaves the device (a STAT job lets paused routine jobs
        go on meanwhile), at most ``wait_s``."""
        with self._cond:
            if stat:
                self._stat_yielding += 1
                self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._finished > finished or not self._running,
                                    self.wait_s)
            finally:
                if stat:
                    self._stat_yielding -= 1
                    self._cond.notify_all()

    def running_jobs(self) -> list[str]:
        with self._cond:
            return [t.job for t in self._running]


def dummy_volume(shape: tuple[int, int, int]) -> Any:
    """A water-filled (0 HU) axial volume of ``shape``, 1 mm voxels, for profiling."""
    from dicomnode.inference.geometry import Volume

    n = shape[0]
    return Volume(
        array=np.zeros(shape, dtype=np.float32),
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        col_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        spacing=(1.0, 1.0, 1.0),
        slice_positions=np.arange(n, dtype=float),
        sop_instance_uids=tuple(f"2.25.{i + 1}" for i in range(n)),
        study_uid="2.25.1", series_uid="2.25.2", frame_of_reference_uid="2.25.3",
        modality="CT",
    )
