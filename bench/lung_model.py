#!/usr/bin/env python3
"""Lung density model benchmark: volumes per second with the model kept warm.

    .venv/bin/python bench/lung_model.py [--runs 5] [--threads N] [--devices cpu,cuda]
                                         [--slices 300] [--out bench/results/lung_model.json]
    .venv/bin/python bench/lung_model.py --smoke --out /tmp/lung.json   # seconds: checks it works

Inputs: the real chest CT in ../shared/data (TCIA Lung-PET-CT-Dx, 64 x 512 x 512, 5 mm;
skipped when absent) and a synthetic 300-slice 512 x 512 series from
``dicomnode.synthetic.make_ct_series`` (1 mm). The model is loaded once per device
(``load_model``, as the worker does), run once to warm up, then ``--runs`` times;
the median seconds per volume is reported (and volumes/s, megavoxels/s). For
context, the same table shows the median time ``load_series`` takes to read the
series from disk (the step before the model in the worker).

``--smoke`` (tests/test_bench_smoke.py): a 24-slice synthetic series only (the model needs >= 20), CPU, 1 run.

This is a benchmark, not a test: it prints figures and never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dicomnode.inference.runtimes import load_model  # noqa: E402
from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic import make_ct_series  # noqa: E402

MODEL_DIR = ROOT / "models" / "lung_density"
TCIA_DIR = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx" / "Lung_Dx-A0001" / "CT_chest_5mm_kernelB"


def _median_seconds(fn: Any, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--devices", default="auto", help="comma list (cpu,cuda) or 'auto'")
    ap.add_argument("--slices", type=int, default=300, help="slices of the synthetic series")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--smoke", action="store_true",
                    help="24 synthetic slices, CPU, 1 run, no real data (checks the bench works)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.slices, args.devices = 1, 24, "cpu"

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) if args.devices == "auto" \
        else [d.strip() for d in args.devices.split(",") if d.strip()]

    series: list[tuple[str, list[Path]]] = []
    if args.smoke:
        print("smoke mode: the real chest CT is not run")
    elif TCIA_DIR.is_dir():
        series.append(("real chest CT (TCIA, 64x512x512, 5 mm)", sorted(TCIA_DIR.glob("*.dcm"))))
    else:
        print(f"(real chest CT not available at {TCIA_DIR}; skipped)")
    tmp = tempfile.TemporaryDirectory(prefix="bench_lung_")
    started = time.perf_counter()
    synth = make_ct_series(Path(tmp.name), n_slices=args.slices)
    print(f"synthetic series of {args.slices} slices written in {time.perf_counter() - started:.1f} s")
    series.append((f"synthetic ({args.slices}x512x512, 1 mm)", synth))

    volumes = []
    for name, paths in series:
        load_s, _ = _median_seconds(lambda p=paths: load_series(p), max(1, min(3, args.runs)))
        volumes.append((name, load_series(paths), load_s))

    print(f"\nlung_density benchmark  python {platform.python_version()}  torch {torch.__version__}"
          f"  CPU threads {torch.get_num_threads()}  runs {args.runs} (median, model warm)")
    header = f"{'series':42} {'device':8} {'s/volume':>9} {'volumes/s':>10} {'Mvox/s':>8} {'load_series s':>14}"
    print(header)
    print("-" * len(header))
    results: list[dict[str, Any]] = []
    for device in devices:
        model = load_model(MODEL_DIR, device)
        for name, volume, load_s in volumes:
            prediction = model.predict(volume)  # warm-up (and CUDA kernels)
            median, times = _median_seconds(lambda v=volume, m=model: m.predict(v), args.runs)
            mvox = volume.array.size / 1e6
            print(f"{name:42} {device:8} {median:9.3f} {1 / median:10.2f} {mvox / median:8.1f} {load_s:14.3f}")
            results.append({
                "series": name, "device": device, "median_s": median, "runs_s": times,
                "volumes_per_s": 1 / median, "megavoxels": mvox, "load_series_s": load_s,
                "measurements": prediction.measurements,
            })

    print("\nmeasurements (first device):")
    for r in results[: len(volumes)]:
        print(f"  {r['series']}")
        for lung, measures in r["measurements"].items():
            text = ", ".join(f"{k} {v:.2f} {u}" for k, (v, u) in measures.items())
            print(f"    {lung:11} {text}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "python": platform.python_version(), "torch": torch.__version__, "smoke": args.smoke,
            "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "results": results,
        }, indent=2, default=str))
        print(f"\nwritten {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
