"""Sharing the device between jobs (dicomnode/worker/gpu.py): admission by memory, a
smaller window batch after an out-of-memory error, STAT preemption between window
batches, the worker's STAT slot, and autocast where the manifest allows it.

The GPU is mocked: :class:`FakeGpu` replaces ``torch.cuda``'s memory functions
(``mem_get_info``, ``memory_allocated``, ``max_memory_allocated``, ...) and the fake
network allocates on it per window batch, raising ``torch.cuda.OutOfMemoryError`` past
its capacity. The network runs for real on the CPU, through the TorchScript runtime's
own sliding window (MONAI ``sliding_window_inference``), so the labels are checked
voxel by voxel. The tests at the end run only where torch sees a GPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicomnode.core.manifest import Manifest
from dicomnode.inference import execution
from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtimes.torchscript import TorchScriptRuntime
from dicomnode.queue.base import Priority
from dicomnode.worker.gpu import DeviceMemoryError, GpuScheduler, dummy_volume

MB = 1 << 20
ROI = (4, 8, 8)
SHAPE = (8, 32, 32)  # 3 x 5 x 5 = 75 windows of ROI at overlap 0.25: 19 batches of 4


class FakeGpu:
    """Device memory bookkeeping in place of ``torch.cuda`` (no caching allocator)."""

    def __init__(self, total: int, resident: int = 0) -> None:
        self.total, self.allocated, self.peak = total, resident, resident
        self.lock = threading.Lock()

    def alloc(self, n: int) -> None:
        with self.lock:
            if self.allocated + n > self.total:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {n / MB:.0f} MiB")
            self.allocated += n
            self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        with self.lock:
            self.allocated -= n

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info",
                            lambda device=None: (self.total - self.allocated, self.total))
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats",
                            lambda device=None: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)


class FakeNet:
    """Two channels (-x, x), so the label is x > 0. Each call (one batch of windows)
    takes ``per_window`` bytes of the fake GPU per window, and ``delay`` seconds."""

    def __init__(self, gpu: FakeGpu | None, per_window: int = 10 * MB, delay: float = 0.0) -> None:
        self.gpu, self.per_window, self.delay = gpu, per_window, delay
        self.calls: list[tuple[str, float, int]] = []  # (thread, start time, windows)
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        need = x.shape[0] * self.per_window
        if self.gpu is not None:
            self.gpu.alloc(need)
        try:
            with self.lock:
                self.calls.append((threading.current_thread().name, time.monotonic(), x.shape[0]))
            if self.delay:
                time.sleep(self.delay)
            return torch.cat([-x, x], dim=1)
        finally:
            if self.gpu is not None:
                self.gpu.free(need)


def _manifest() -> Manifest:
    return Manifest.model_validate({
        "name": "fake", "version": "1.0", "runtime": "torchscript", "weights": "model.ts",
        "patch_size": list(ROI),
        "labels": [{"value": 1, "name": "tissue",
                    "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                    "type": {"value": "85756007", "meaning": "Tissue"}}],
    })


def _runtime(tmp_path: Path, net: FakeNet) -> TorchScriptRuntime:
    """The real TorchScript runtime (its sliding window and scheduler hooks), whose
    network is then swapped for ``net``."""
    folder = tmp_path / "fake"
    folder.mkdir(exist_ok=True)
    torch.jit.script(torch.nn.Identity()).save(str(folder / "model.ts"))
    runtime = TorchScriptRuntime(_manifest(), folder, "cpu")
    runtime.load()
    runtime._module = net
    return runtime


def _volume(seed: int, shape: tuple[int, int, int] = SHAPE) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.choice([-1.0, 1.0], size=shape).astype(np.float32) * rng.uniform(
        0.5, 2.0, size=shape).astype(np.float32)
    base = dummy_volume(shape)
    return Volume(array, base.origin, base.row_direction, base.col_direction,
                  base.slice_direction, base.spacing, base.slice_positions,
                  base.sop_instance_uids, base.study_uid, base.series_uid,
                  base.frame_of_reference_uid, base.modality)


def _correct(prediction: Any, volume: Volume) -> bool:
    return bool(np.array_equal(prediction.labels, (volume.array > 0).astype(np.uint8)))


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    fake = FakeGpu(total=1000 * MB, resident=100 * MB)
    fake.install(monkeypatch)
    return fake


# -- profiles and admission -----------------------------------------------------------


def test_warm_up_measures_the_peak_and_scales_it(gpu: FakeGpu, tmp_path: Path) -> None:
    scheduler = GpuScheduler("cuda")
    runtime = _runtime(tmp_path, FakeNet(gpu, per_window=10 * MB))
    profile = scheduler.profile("fake", runtime, shape=SHAPE)
    assert profile.peak_bytes == 4 * 10 * MB  # one batch of 4 windows, above the resident
    assert profile.estimate(int(np.prod(SHAPE))) == 40 * MB
    assert profile.estimate(2 * int(np.prod(SHAPE))) == 80 * MB  # a larger volume
    assert gpu.allocated == 100 * MB  # nothing left behind


def test_cpu_measures_nothing_and_admits_everything(tmp_path: Path) -> None:
    scheduler = GpuScheduler("cpu")
    net = FakeNet(None)
    runtime = _runtime(tmp_path, net)
    assert scheduler.profile("fake", runtime, shape=SHAPE).peak_bytes is None
    volume = _volume(1)
    assert _correct(scheduler.predict("1", "fake", runtime, volume), volume)
    assert scheduler.stats.admitted == 1 and len(net.calls) == 19


def _run_two(scheduler: GpuScheduler, runtime: Any) -> dict[str, tuple[float, float]]:
    spans: dict[str, tuple[float, float]] = {}
    results: dict[str, bool] = {}

    def job(name: str, seed: int) -> None:
        volume = _volume(seed)
        start = time.monotonic()
        results[name] = _correct(scheduler.predict(name, "fake", runtime, volume), volume)
        spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=job, args=(f"job{n}", n), name=f"job{n}") for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"job1": True, "job2": True}
    return spans


def _overlap(net: FakeNet) -> bool:
    """Did the two jobs' network calls interleave?"""
    names = [name for name, _, _ in sorted(net.calls, key=lambda c: c[1])]
    changes = sum(1 for a, b in zip(names, names[1:], strict=False) if a != b)
    return changes > 1


def test_jobs_run_side_by_side_while_memory_allows(gpu: FakeGpu, tmp_path: Path) -> None:
    net = FakeNet(gpu, per_window=10 * MB, delay=0.01)
    runtime = _runtime(tmp_path, net)
    scheduler = GpuScheduler("cuda")
    scheduler.profile("fake", runtime, shape=SHAPE)  # 40 MB each; 900 MB free
    net.calls.clear()
    _run_two(scheduler, runtime)
    assert _overlap(net)
    assert scheduler.stats.oom_retries == 0


def test_a_job_waits_while_free_memory_does_not_allow_it(
        gpu: FakeGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = FakeNet(gpu, per_window=10 * MB, delay=0.01)
    runtime = _runtime(tmp_path, net)
    scheduler = GpuScheduler("cuda")
    scheduler.profile("fake", runtime, shape=SHAPE)
    net.calls.clear()
    # another process takes the GPU: 60 MB free, enough for one job (40 MB + 15 %) only
    gpu.allocated = gpu.total - 60 * MB
    gpu.peak = gpu.allocated
    scheduler._baseline = gpu.allocated
    spans = _run_two(scheduler, runtime)
    assert not _overlap(net)
    first, second = sorted(spans.values())
    assert second[1] >= first[1]  # the second finished after the first
    assert scheduler.stats.oom_retries == 0


# -- out of memory ----------------------------------------------------------------------


def test_out_of_memory_retries_with_half_the_window_batch(gpu: FakeGpu, tmp_path: Path) -> None:
    net = FakeNet(gpu, per_window=300 * MB)  # 4 windows: 1200 MB > 900 MB free; 2 fit
    runtime = _runtime(tmp_path, net)
    scheduler = GpuScheduler("cuda")
    volume = _volume(3)
    prediction = scheduler.predict("1", "fake", runtime, volume)
    assert _correct(prediction, volume)
    assert scheduler.stats.batch_halvings == 1 and scheduler.stats.oom_retries == 1
    assert {n for _, _, n in net.calls} == {2, 1}  # 75 windows in batches of 2 (the last 1)
    assert gpu.allocated == 100 * MB


def test_out_of_memory_beside_another_job_waits_for_it(gpu: FakeGpu, tmp_path: Path) -> None:
    from dicomnode.worker.gpu import ModelProfile

    hog_holds, hog_go = threading.Event(), threading.Event()

    class Hog:  # a job of another model that holds 750 MB for a while
        def predict(self, volume: Any) -> None:
            gpu.alloc(750 * MB)
            hog_holds.set()
            hog_go.wait(10)
            gpu.free(750 * MB)

    scheduler = GpuScheduler("cuda", wait_s=10)
    scheduler.profiles["hog"] = ModelProfile("hog", 750 * MB, int(np.prod(SHAPE)))
    # the model's profile underestimates it (10 MB): it is admitted beside the hog
    scheduler.profiles["fake"] = ModelProfile("fake", 10 * MB, int(np.prod(SHAPE)))
    hog = threading.Thread(target=scheduler.predict, args=("hog", "hog", Hog(), _volume(0)))
    hog.start()
    assert hog_holds.wait(10)

    def release_hog_once_stuck() -> None:  # after three OOMs (batch 4, 2, 1) the job waits
        deadline = time.monotonic() + 20
        while scheduler.stats.waits_for_memory == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        hog_go.set()

    threading.Thread(target=release_hog_once_stuck).start()
    runtime = _runtime(tmp_path, FakeNet(gpu, per_window=200 * MB))
    volume = _volume(4)
    # 150 MB free: batches of 4 (800 MB), 2 and 1 (200 MB) do not fit beside the hog;
    # the job waits for the hog to finish, then runs with batch 1
    prediction = scheduler.predict("1", "fake", runtime, volume)
    hog.join(10)
    assert _correct(prediction, volume)
    assert scheduler.stats.batch_halvings == 2 and scheduler.stats.waits_for_memory == 1
    assert scheduler.stats.oom_retries == 3 and gpu.allocated == 100 * MB


def test_a_job_that_never_fits_fails_with_a_reason(gpu: FakeGpu, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeNet(gpu, per_window=2000 * MB))
    scheduler = GpuScheduler("cuda")
    with pytest.raises(DeviceMemoryError, match="alone on cuda with the smallest batch"):
        scheduler.predict("1", "fake", runtime, _volume(5))
    assert scheduler.stats.batch_halvings == 2  # 4 -> 2 -> 1, then it gave up


def test_other_errors_are_not_retried(gpu: FakeGpu, tmp_path: Path) -> None:
    class Broken(FakeNet):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("bad weights")

    scheduler = GpuScheduler("cuda")
    with pytest.raises(ValueError, match="bad weights"):
        scheduler.predict("1", "fake", _runtime(tmp_path, Broken(gpu)), _volume(6))
    assert scheduler.stats.oom_retries == 0 and scheduler.running_jobs() == []


# -- STAT preemption ---------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_stat_job_preempts_a_running_routine_job(
        device: str, gpu: FakeGpu, tmp_path: Path) -> None:
    net = FakeNet(gpu if device == "cuda" else None, delay=0.02)
    runtime = _runtime(tmp_path, net)
    scheduler = GpuScheduler(device)
    scheduler.profile("fake", runtime, shape=SHAPE)
    net.calls.clear()
    routine_volume, stat_volume = _volume(7), _volume(8)
    done: dict[str, tuple[bool, float]] = {}

    def routine() -> None:
        p = scheduler.predict("routine", "fake", runtime, routine_volume, Priority.ROUTINE)
        done["routine"] = (_correct(p, routine_volume), time.monotonic())

    r = threading.Thread(target=routine, name="routine")
    r.start()
    while len(net.calls) < 3:  # the routine job is well into its windows
        time.sleep(0.005)
    with scheduler.stat("stat"):
        p = scheduler.predict("stat", "fake", runtime, stat_volume, Priority.STAT)
        done["stat"] = (_correct(p, stat_volume), time.monotonic())
    r.join(30)

    assert done["routine"][0] and done["stat"][0]
    assert done["stat"][1] < done["routine"][1]
    order = [name for name, _, _ in net.calls]
    first_stat = order.index("MainThread")
    last_stat = len(order) - 1 - order[::-1].index("MainThread")
    # no routine window batch started while the STAT job ran; it resumed afterwards
    assert "routine" not in order[first_stat:last_stat + 1]
    assert order.count("routine") == 19 and order.count("MainThread") == 19
    assert order[-1] == "routine"
    assert scheduler.stats.pauses == 1 and scheduler.stats.paused_jobs == ["routine"]


def test_routine_jobs_do_not_start_while_a_stat_job_is_in_progress(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeNet(None))
    scheduler = GpuScheduler("cpu")
    started = threading.Event()

    def routine() -> None:
        scheduler.predict("routine", "fake", runtime, _volume(9), Priority.ROUTINE)
        started.set()

    with scheduler.stat("stat"):
        threading.Thread(target=routine).start()
        assert not started.wait(0.3)  # held back
    assert started.wait(10)


def test_worker_runs_a_stat_job_in_its_own_slot_while_a_routine_job_pauses(
        tmp_path: Path) -> None:
    import json

    import pydicom

    from dicomnode.config import parse_config
    from dicomnode.core.index import Index, InstanceRecord
    from dicomnode.inference.volume import load_series
    from dicomnode.ingest.spool import Spool
    from dicomnode.queue.base import JobState
    from dicomnode.queue.sqlite import SQLiteJobQueue
    from dicomnode.synthetic import make_ct_series
    from dicomnode.worker.inference import InferenceWorker

    storage = tmp_path / "storage"
    config = parse_config({"storage": str(storage),
                           "inference": {"parallel_jobs": 1, "preload": False}})
    spool, index = Spool(storage), Index(Index.path_for(storage))
    series = {}
    for name, seed in (("routine", 1), ("stat", 2)):
        for f in make_ct_series(tmp_path / name, 8, 32, 32, seed=seed):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
            size = spool.store(target, [f.read_bytes()])
            index.add_instance(InstanceRecord(
                ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                "1.2.840.10008.1.2.1", "TEST", size, 1.0, str(target.relative_to(spool.root))))
        series[name] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    net = FakeNet(None, delay=0.03)
    runtime = _runtime(tmp_path, net)

    class Pool:
        device = "cpu"

        def get(self, name: str) -> Any:
            return runtime

    queue = SQLiteJobQueue(SQLiteJobQueue.path_for(storage))
    worker = InferenceWorker(config, index, queue, Pool())  # type: ignore[arg-type]
    assert [p for _, p in worker.slots] == [None, Priority.STAT]  # 1 routine + 1 STAT slot

    def payload(name: str) -> dict[str, Any]:
        study, series_uid = series[name]
        return {"study_uid": study, "revision": 1, "series_uid": series_uid, "rule": name,
                "destinations": []}

    routine = queue.add("k-routine", "fake", payload("routine"), priority=Priority.ROUTINE)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for t, _, _ in net.calls if t == "inference-0") < 3:
            assert time.monotonic() < deadline, "the routine job never started"
            time.sleep(0.01)
        stat = queue.add("k-stat", "fake", payload("stat"), priority=Priority.STAT)
        worker.notify()
        while {queue.get(j.id).state for j in (routine, stat)} != {JobState.DONE}:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the jobs did not finish"
            time.sleep(0.05)
    finally:
        worker.stop()
    done = {j.key: queue.get(j.id) for j in (routine, stat)}
    assert done["k-stat"].updated_at < done["k-routine"].updated_at  # type: ignore[union-attr]
    order = [t for t, _, _ in net.calls]
    stat_calls = [i for i, t in enumerate(order) if t == "inference-stat"]
    assert len(stat_calls) == 19 and order.count("inference-0") == 19
    assert "inference-0" not in order[stat_calls[0]:stat_calls[-1] + 1]
    assert worker.scheduler.stats.paused_jobs == [str(routine.id)]
    for key, name in (("k-routine", "routine"), ("k-stat", "stat")):
        job = done[key]
        meta = json.loads((worker.result_dir(job) / "prediction.json").read_text())  # type: ignore[arg-type]
        labels = np.load(storage / meta["labels_path"])["labels"]
        rows = index.study_series(series[name][0])[series[name][1]]
        volume = load_series([storage / r.path for r in rows])
        assert np.array_equal(labels, (volume.array > 0).astype(np.uint8)), name
    queue.close()
    index.close()


# -- hooks and autocast ------------------------------------------------------------------


def test_hooks_are_no_ops_without_a_scheduler() -> None:
    def net(x: Any) -> Any:
        return x

    assert execution.guard(net) is net
    assert execution.window_batch(4) == 4
    ex = execution.Execution(sw_batch_size=2)
    with execution.running(ex):
        assert execution.window_batch(4) == 2 and ex.asked_batch == 4 and ex.used_batch == 2
        assert execution.window_batch(1) == 1
        assert execution.guard(net)(5) == 5 and ex.calls == 1
    assert execution.current() is None


def test_run_inferer_lowers_a_monai_inferers_batch_on_a_copy() -> None:
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=4, overlap=0.25)
    seen: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.cat([-x, x], dim=1)

    x = torch.from_numpy(_volume(10).array)[None, None]
    with execution.running(execution.Execution(sw_batch_size=2)) as ex:
        out = execution.run_inferer(inferer, x, net)
    assert inferer.sw_batch_size == 4  # the shared inferer is untouched
    assert max(seen) == 2 and ex.calls == len(seen) == 38
    assert torch.equal(out.argmax(1)[0], (x[0, 0] > 0).long())


def test_manifest_may_turn_autocast_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.inference.runtimes import torchscript

    entered: list[bool] = []

    class Autocast:
        def __init__(self, **kwargs: Any) -> None:
            entered.append(True)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    monkeypatch.setattr(torch, "autocast", Autocast)
    x = torch.ones(1, 1, 2, 2, 2)
    torchscript.run_network(x, lambda t: torch.cat([-t, t], 1), "cuda", amp=False)
    assert entered == []
    torchscript.run_network(x, lambda t: torch.cat([-t, t], 1), "cuda", amp=True)
    assert entered == [True]
    assert _manifest().mixed_precision is True
    assert Manifest.model_validate({**_manifest().model_dump(), "mixed_precision": False}
                                   ).mixed_precision is False


# -- on a real GPU -------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@cuda
def test_real_gpu_profile_admission_and_amp(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    folder = tmp_path / "unet"
    folder.mkdir()
    torch.jit.script(net).save(str(folder / "model.ts"))
    manifest = Manifest.model_validate({**_manifest().model_dump(), "patch_size": [32, 64, 64]})
    runtime = TorchScriptRuntime(manifest, folder, "cuda")
    runtime.load()
    scheduler = GpuScheduler("cuda")
    profile = scheduler.profile("fake", runtime, shape=(64, 256, 256))
    assert profile.peak_bytes is not None and profile.peak_bytes > 0
    volumes = [_volume(n, (64, 256, 256)) for n in (11, 12)]
    results: list[Any] = [None, None]

    def job(n: int) -> None:
        results[n] = scheduler.predict(str(n), "fake", runtime, volumes[n])

    threads = [threading.Thread(target=job, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.labels.shape == (64, 256, 256) for r in results)
    assert scheduler.stats.admitted == 2
