#!/usr/bin/env python3
"""GPU throughput: a stream of studies through the node on the GPU, against a naive
MONAI loop on the same studies, in one run; prints a JSON report.

    python bench/gpu.py [--studies 6] [--slices 300] [--network spleen|wholebody]
                        [--senders 2] [--out bench/results/gpu.json] [--smoke]

The model is a MONAI bundle written to the scratch folder with random weights (nothing
is downloaded): ``spleen`` is the ``spleen_ct_segmentation`` zoo bundle's network and
inferer (UNet 16-256, 96^3 windows, batch 4, overlap 0.5, ScaleIntensityRanged),
``wholebody`` the ``wholeBody_ct_segmentation`` one's SegResNet (32 filters, gaussian
96^3 windows, batch 1, overlap 0.25) with 2 output channels instead of 105. Both run on
the volume's own grid (no resampling), in the node and in the naive loop alike.

**The node**: ``python -m dicomnode serve`` on CUDA, routing the CT to that bundle
(``monai_bundle`` runtime, autocast, two jobs in flight, the GPU scheduler), results
(SEG + SR) to a small C-STORE receiver in this process that plays the PACS. The
studies (synthetic 512x512 CT, ``dicomnode.synthetic``) are sent by ``--senders``
associations at once, back to back, as a PACS forwards a worklist.

**The naive loop**: the same network loaded once, in eager mode and float32; per study
``LoadImage(reader="PydicomReader")`` on the series folder, ``ScaleIntensityRange``,
``sliding_window_inference`` with the same windows, argmax, to the CPU.

**Measured**: studies per minute (node: studies / (last result stored - first study
sent); naive: studies / its total time), the ratio, and the GPU busy fraction sampled
every ``--sample-ms`` with NVML (``pynvml``, optional) or ``torch.cuda.utilization``,
averaged over the node's inference window (first job started to last result stored)
and over the naive loop. Targets: busy >= 80 %, node >= 2x the naive loop (PASS/MISS,
never an exit status: that is 1 only when a study's results did not arrive).

``--smoke`` runs everything on the CPU in seconds (2 studies of 12 slices of 64 x 64, a
tiny UNet): it checks that the bench works (tests/test_bench_smoke.py). Without
``--smoke`` and without a GPU it prints "no GPU: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"
BUSY_TARGET = 0.80
RATIO_TARGET = 2.0
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")

# the zoo bundles' networks and inferers (configs in ../shared/data/monai-model-zoo)
NETWORKS: dict[str, dict[str, Any]] = {
    "spleen": {
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                        "out_channels": 2, "channels": [16, 32, 64, 128, 256],
                        "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96],
                    "sw_batch_size": 4, "overlap": 0.5},
        "intensity": {"a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
    "wholebody": {
        "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1,
                        "out_channels": 2, "init_filters": 32, "blocks_down": [1, 2, 2, 4],
                        "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96],
                    "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian",
                    "padding_mode": "replicate"},
        "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
    "tiny": {  # --smoke
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                        "out_channels": 2, "channels": [4, 8], "strides": [2],
                        "num_res_units": 1},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [8, 32, 32],
                    "sw_batch_size": 4, "overlap": 0.25},
        "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
}


# -- the model ----------------------------------------------------------------------------


def write_bundle(folder: Path, network: str) -> dict[str, Any]:
    """A MONAI bundle (+ dicomnode manifest) of ``network`` with random weights."""
    import torch
    from monai.bundle import ConfigParser

    spec = NETWORKS[network]
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "network_def": spec["network_def"],
        "inferer": spec["inferer"],
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "ScaleIntensityRanged", "keys": "image", **spec["intensity"]}]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    (folder / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0", "network_data_format": {"outputs": {"pred": {
            "num_channels": 2, "channel_def": {"0": "background", "1": "region"}}}}}))
    torch.manual_seed(0)
    net = ConfigParser({"net": spec["network_def"]}).get_parsed_content("net")
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    manifest = {
        "name": folder.name, "version": "0.1.0", "runtime": "monai_bundle",
        "description": f"bench/gpu.py: {network} network, random weights (not a model)",
        "labels": [{"value": 1, "name": "region",
                    "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                    "type": {"value": "78961009", "meaning": "Spleen"}}],
        "outputs": ["seg", "sr"],
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return spec


# -- the studies --------------------------------------------------------------------------


def _one_study(args: tuple[Path, int, int, int]) -> list[str]:
    from dicomnode.synthetic import make_ct_series

    folder, slices, size, seed = args
    return [str(p) for p in make_ct_series(folder, n_slices=slices, rows=size, cols=size,
                                           seed=seed)]


def make_studies(scratch: Path, n: int, slices: int, size: int) -> list[list[Path]]:
    jobs = [(scratch / "studies" / f"study{i:02d}", slices, size, 100 + i) for i in range(n)]
    with ProcessPoolExecutor(min(n, os.cpu_count() or 1)) as pool:
        return [[Path(p) for p in paths] for paths in pool.map(_one_study, jobs)]


def study_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


# -- the PACS, the sender, the GPU sampler --------------------------------------------------


class Pacs:
    """A C-STORE receiver that notes when each result arrives (SOP class, study)."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrivals: list[tuple[float, str, str]] = []  # (time, SOP class, study UID)
        self.lock = threading.Lock()
        ae = AE(ae_title="BENCHPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_pdu_size = 0  # unlimited
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.socket.getsockname()[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        with self.lock:
            self.arrivals.append((time.time(), str(ds.SOPClassUID), str(ds.StudyInstanceUID)))
        return 0x0000

    def done(self, study: str) -> float | None:
        """When both the SEG and the SR of ``study`` had arrived (None if not yet)."""
        with self.lock:
            seg = [t for t, c, s in self.arrivals if s == study and c == SEG_CLASS]
            sr = [t for t, c, s in self.arrivals if s == study and c != SEG_CLASS]
        return max(seg[0], sr[0]) if seg and sr else None

    def stop(self) -> None:
        self.server.shutdown()


def send_study(port: int, paths: list[Path]) -> tuple[float, float]:
    """C-STORE one study over one association; (start, end) as unix times."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    start = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            if not status or int(status.Status) != 0:
                raise RuntimeError(f"C-STORE of {p.name} failed: {status}")
    finally:
        assoc.release()
    return start, time.time()


class GpuSampler:
    """GPU utilisation (percent of time a kernel ran) every ``period`` seconds, with
    NVML (pynvml) or torch.cuda.utilization; ``available`` is False where neither works."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._read: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.source = "NVML"
        except Exception:  # noqa: BLE001 - pynvml absent, or no NVIDIA driver
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.utilization()
                    self._read = lambda: float(torch.cuda.utilization())
                    self.source = "torch.cuda.utilization"
            except Exception:  # noqa: BLE001
                self._read = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    @property
    def available(self) -> bool:
        return self._read is not None

    def start(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:  # noqa: BLE001 - a failed read is a missing sample
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def busy(self, start: float, end: float) -> float | None:
        """Mean utilisation in [start, end] as a fraction; None without samples."""
        values = [u for t, u in self.samples if start <= t <= end]
        return round(statistics.fmean(values) / 100.0, 3) if values else None


# -- the node -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeRun:
    studies: int
    device: str
    first_sent: float = 0.0
    last_sent: float = 0.0
    first_job_started: float | None = None
    last_done: float | None = None
    done: dict[str, float] = field(default_factory=dict)  # study -> results stored
    sent: dict[str, float] = field(default_factory=dict)  # study -> last instance acked
    jobs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_tail: str = ""


def run_node(scratch: Path, models: Path, model: str, studies: list[list[Path]],
             device: str, senders: int, quiet: float, timeout: float) -> NodeRun:
    run = NodeRun(len(studies), device)
    pacs = Pacs()
    port = free_port()
    storage = scratch / "node"
    config = {
        "ae_title": "DICOMNODE", "bind_address": "127.0.0.1", "port": port,
        "storage": str(storage), "log_level": "INFO", "http": {"port": 0},
        "models_dir": str(models), "completion": {"quiet_seconds": quiet},
        "ingest": {"processes": 1 if device == "cpu" else 4},
        "inference": {"device": device, "preload": True},
        "destinations": [{"name": "pacs", "ae_title": "BENCHPACS", "host": "127.0.0.1",
                          "port": pacs.port, "objects": ["seg", "sr"]}],
        "export": {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0},
        "routing": [{"name": "ct", "model": model, "destinations": ["pacs"],
                     "match": {"modality": ["CT"]}}],
    }
    storage.mkdir(parents=True)
    config_path = scratch / "node.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = scratch / "node.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                                 str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    uids = [study_uid(s) for s in studies]
    try:
        deadline = time.monotonic() + timeout
        while " ready on " not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start")
            time.sleep(0.1)
        run.first_sent = time.time()
        with ThreadPoolExecutor(senders) as pool:
            spans = list(pool.map(lambda s: send_study(port, s), studies))
        run.last_sent = max(end for _, end in spans)
        run.sent = {u: end for u, (_, end) in zip(uids, spans, strict=True)}
        while time.monotonic() < deadline:
            finished = {u: pacs.done(u) for u in uids}
            if all(t is not None for t in finished.values()):
                run.done = {u: float(t) for u, t in finished.items() if t is not None}
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with {proc.returncode}")
            errors = [line for line in log_path.read_text(errors="replace").splitlines()
                      if " ERROR " in line]
            if errors:  # a failed job is only retried: stop here
                raise RuntimeError(f"the node logged an error: {errors[0]}")
            time.sleep(0.1)
        else:
            run.problems.append(f"results of {sum(pacs.done(u) is None for u in uids)} "
                                f"study(ies) did not arrive within {timeout:.0f} s")
    except Exception as exc:  # noqa: BLE001 - reported, the node is stopped below
        run.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pacs.stop()
    text = log_path.read_text(errors="replace")
    run.log_tail = "\n".join(text.splitlines()[-40:])
    errors = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
    if errors:
        run.problems.append(f"node logged errors: {errors[0]}")
    starts = [_log_time(line) for line in text.splitlines() if re.search(r"INFO [\w.]+: job \d+ started", line)]
    run.first_job_started = min((t for t in starts if t is not None), default=None)
    run.last_done = max(run.done.values()) if run.done else None
    status = subprocess.run([sys.executable, "-m", "dicomnode", "status", "--json", "--config",
                             str(config_path)], capture_output=True, text=True, env=env,
                            timeout=120)
    try:
        run.jobs = [{"id": j["id"], "state": j["state"],
                     "seconds": (j.get("result") or {}).get("seconds"),
                     "model_seconds": (j.get("result") or {}).get("model_seconds"),
                     "device": (j.get("result") or {}).get("device")}
                    for j in json.loads(status.stdout)["jobs"]]
    except (ValueError, KeyError, TypeError):
        run.problems.append(f"dicomnode status failed: {status.stderr.strip()[:300]}")
    return run


def _log_time(line: str) -> float | None:
    m = LOG_LINE.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


# -- the naive loop -------------------------------------------------------------------------


def run_naive(spec: dict[str, Any], studies: list[list[Path]], device: str) -> list[float]:
    """LoadImage + sliding_window_inference per study, the model loaded once (eager,
    float32, as a MONAI tutorial writes it). Returns each study's seconds."""
    import torch
    from monai.bundle import ConfigParser
    from monai.inferers import sliding_window_inference
    from monai.transforms import LoadImage, ScaleIntensityRange

    torch.manual_seed(0)
    net = ConfigParser({"net": spec["network_def"]}).get_parsed_content("net").to(device).eval()
    loader = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    scale = ScaleIntensityRange(**spec["intensity"])
    inf = spec["inferer"]
    extra = {k: inf[k] for k in ("mode", "padding_mode") if k in inf}
    seconds = []
    for paths in studies:
        start = time.perf_counter()
        image = scale(loader(str(paths[0].parent)))
        with torch.no_grad():
            x = torch.as_tensor(image)[None].to(device)
            logits = sliding_window_inference(x, inf["roi_size"], inf["sw_batch_size"], net,
                                              overlap=inf["overlap"], **extra)
            labels = torch.argmax(logits, dim=1).to(torch.uint8).cpu().numpy()
        assert labels.size == sum(1 for _ in paths) * image.shape[1] * image.shape[2]
        seconds.append(time.perf_counter() - start)
    return seconds


# -- report --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


def report(args: argparse.Namespace, device: str, node: NodeRun, naive: list[float],
           node_busy: float | None, naive_busy: float | None, sampler: GpuSampler,
           spec: dict[str, Any]) -> dict[str, Any]:
    n = node.studies
    node_span = (node.last_done - node.first_sent) if node.last_done else None
    node_rate = 60.0 * n / node_span if node_span else None
    naive_rate = 60.0 * len(naive) / sum(naive) if naive else None
    ratio = node_rate / naive_rate if node_rate and naive_rate else None
    latencies = [node.done[u] - node.sent[u] for u in node.done if u in node.sent]
    model_s = [j["model_seconds"] for j in node.jobs if j.get("model_seconds") is not None]
    targets = []
    if node_busy is not None:
        targets.append({"what": "GPU busy fraction, node (first job started -> last result "
                        "stored)", "value": node_busy, "goal": f">= {BUSY_TARGET:g}",
                        "passed": node_busy >= BUSY_TARGET})
    if ratio is not None:
        targets.append({"what": "studies per minute, node / naive MONAI loop",
                        "value": round(ratio, 2), "goal": f">= {RATIO_TARGET:g}",
                        "passed": ratio >= RATIO_TARGET})
    return {
        "bench": "gpu", "device": device, "machine": machine(),
        "settings": {"studies": n, "slices": args.slices, "size": args.size,
                     "network": args.network if not args.smoke else "tiny",
                     "inferer": spec["inferer"],
                     "senders": args.senders, "quiet_seconds": args.quiet,
                     "smoke": args.smoke, "sample_ms": args.sample_ms},
        "gpu_sampling": sampler.source if sampler.available else "unavailable (no NVML, no CUDA)",
        "node": {
            "studies_per_minute": _r(node_rate),
            "stream_seconds": _r(node_span),
            "send_seconds": _r(node.last_sent - node.first_sent),
            "busy_fraction": node_busy,
            "latency_seconds_median": _r(statistics.median(latencies)) if latencies else None,
            "latency_seconds_max": _r(max(latencies)) if latencies else None,
            "model_seconds_median": _r(statistics.median(model_s)) if model_s else None,
            "jobs": node.jobs,
        },
        "naive": {
            "studies_per_minute": _r(naive_rate),
            "seconds_per_study": [_r(s) for s in naive],
            "busy_fraction": naive_busy,
        },
        "ratio_node_to_naive": _r(ratio),
        "targets": targets,
        "problems": node.problems,
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=6, help="studies in the stream (default 6)")
    p.add_argument("--slices", type=int, default=300, help="slices per study (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--network", choices=("spleen", "wholebody"), default="spleen",
                   help="the zoo bundle whose network and inferer run (default spleen)")
    p.add_argument("--senders", type=int, default=2, help="associations at once (default 2)")
    p.add_argument("--quiet", type=float, default=1.0,
                   help="the node's completion quiet window in seconds (default 1.0)")
    p.add_argument("--sample-ms", type=float, default=50.0, help="GPU sampling period (ms)")
    p.add_argument("--timeout", type=float, default=600.0, help="for the node's stream (s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (also printed)")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder")
    p.add_argument("--smoke", action="store_true",
                   help="on the CPU: 2 studies of 12 slices of 64x64, a tiny UNet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.smoke:
        device = "cpu"
        args.studies, args.slices, args.size, args.quiet = 2, 12, 64, 0.3
        args.senders = min(args.senders, 2)
        network = "tiny"
    elif not torch.cuda.is_available():
        print("no GPU: skipped (torch sees no CUDA device; bench/gpu.py --smoke runs on the CPU)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bench": "gpu", "skipped": "no GPU"}, indent=2) + "\n")
        return 0
    else:
        device, network = "cuda", args.network
    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-gpu-", dir=args.tmp))
    print(f"bench/gpu.py: {args.studies} studies of {args.slices} x {args.size}^2, "
          f"{network} network on {device}, scratch {scratch}", file=sys.stderr, flush=True)
    sampler = GpuSampler(args.sample_ms / 1000.0).start()
    try:
        models = scratch / "models"
        spec = write_bundle(models / "bench_unet", network)
        t = time.perf_counter()
        studies = make_studies(scratch, args.studies, args.slices, args.size)
        print(f"generated the studies in {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
        node = run_node(scratch, models, "bench_unet", studies, device, args.senders,
                        args.quiet, args.timeout)
        node_busy = (sampler.busy(node.first_job_started, node.last_done)
                     if node.first_job_started and node.last_done else None)
        print(f"node: {len(node.done)}/{len(studies)} studies' results stored"
              + (f"; problems: {node.problems}" if node.problems else ""), file=sys.stderr,
              flush=True)
        naive_start = time.time()
        naive = run_naive(spec, studies, device)
        naive_busy = sampler.busy(naive_start, time.time())
    finally:
        sampler.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    out = report(args, device, node, naive, node_busy, naive_busy, sampler, spec)
    if node.problems:
        out["node_log_tail"] = node.log_tail
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    for t in out["targets"]:
        print(f"{'PASS' if t['passed'] else 'MISS'}  {t['what']}: {t['value']} (target "
              f"{t['goal']})", file=sys.stderr)
    return 1 if node.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
