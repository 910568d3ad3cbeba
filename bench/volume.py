"""Benchmark: series -> float32 volume, the node's loader against named baselines.

    .venv/bin/python bench/volume.py [--runs 7] [--slices 300] [--out FILE.json] [--smoke]

Compares, on the same files and in one run:

* ``dicomnode``: ``dicomnode.inference.volume.load_series`` (the node's loader);
* ``monai``: ``monai.transforms.LoadImage(reader=monai.data.PydicomReader())`` on the folder;
* ``pydicom loop``: ``dcmread`` each file, sort by position along the normal, stack
  ``pixel_array * slope + intercept`` as float32;
* ``bytes floor``: read each file's bytes and convert its trailing pixel bytes into a
  preallocated float32 array (no parsing, no checks): what no loader can beat.

Inputs: the real chest CT in ../shared/data (if present) and a synthetic 300-slice
512x512 CT written to a temporary folder. Every method runs once untimed (warm page
cache, imports), then the methods are interleaved ``--runs`` times and the median
is reported. The voxels are verified equal before timing: MONAI's array is
``[j, i, n]`` in InstanceNumber order (``swap_ij`` + stacking on the last axis), so
``monai.transpose(2, 1, 0)[r] == volume.array[argsort(instance_numbers)[r]]``.

Target: dicomnode at least 6x faster than MONAI LoadImage (median). Timings on a
shared machine are noisy; the medians of interleaved runs are what is reported.
Exit status 1 on a MISS or when the voxels differ. Without MONAI the MONAI baseline is
skipped with a message. ``--smoke``: 8 slices of 64x64, 1 run, no real data; checks
that the bench works (tests/test_bench_smoke.py) and fails only on different voxels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic import make_ct_series  # noqa: E402

CHEST = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx" / "Lung_Dx-A0001" / "CT_chest_5mm_kernelB"
TARGET = 6.0


def pydicom_loop(files: list[Path]) -> np.ndarray:
    datasets = [pydicom.dcmread(f) for f in files]
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    return np.stack([
        (ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)))
        .astype(np.float32)
        for ds in datasets
    ])


def bytes_floor(files: list[Path], rows: int, cols: int) -> np.ndarray:
    out = np.empty((len(files), rows, cols), dtype=np.float32)
    n = rows * cols
    for k, f in enumerate(files):
        data = f.read_bytes()
        np.copyto(out[k], np.frombuffer(data, "<u2", count=n, offset=len(data) - 2 * n).reshape(rows, cols),
                  casting="unsafe")
    return out


def bench(name: str, folder: Path, runs: int, timing_target: bool = True) -> dict[str, object]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    vol = load_series(files)
    rows, cols = vol.shape[1:]
    methods: dict[str, Callable[[], object]] = {"dicomnode": lambda: load_series(files)}
    have_monai = importlib.util.find_spec("monai") is not None
    if have_monai:
        from monai.data import PydicomReader
        from monai.transforms import LoadImage

        loader = LoadImage(reader=PydicomReader(), image_only=True)
        methods["monai LoadImage"] = lambda: loader(str(folder))
    else:
        print("skipping the MONAI LoadImage baseline: monai is not installed")
    methods["pydicom loop"] = lambda: pydicom_loop(files)
    methods["bytes floor"] = lambda: bytes_floor(files, rows, cols)
    # Same voxels (and warm-up: every method runs once untimed).
    same_monai = None
    if have_monai:
        monai_img = np.asarray(methods["monai LoadImage"]())
        by_instance = np.argsort(np.asarray(vol.metadata["instance_numbers"]), kind="stable")
        same_monai = np.array_equal(vol.array[by_instance], monai_img.transpose(2, 1, 0))
    same_loop = np.array_equal(vol.array, methods["pydicom loop"]())
    methods["bytes floor"]()
    methods["dicomnode"]()

    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(runs):
        for m, fn in methods.items():  # interleaved: noise hits every method alike
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}

    print(f"\n{name}: {len(files)} slices {rows}x{cols} ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB), "
          f"median of {runs} warm interleaved runs")
    print(f"  same voxels as MONAI (after [j,i,n] -> [k,i,j] + InstanceNumber order): {same_monai}; "
          f"as the pydicom loop: {same_loop}")
    ref = "monai LoadImage" if have_monai else "pydicom loop"
    for m in methods:
        print(f"  {m:16s} {med[m]:8.3f} s  (min {min(times[m]):.3f})  "
              f"{med[ref] / med[m]:6.1f}x vs {ref}")
    ratio = med["monai LoadImage"] / med["dicomnode"] if have_monai else None
    same = same_loop and same_monai is not False
    passed = same and (ratio is not None and ratio >= TARGET or not timing_target)
    if ratio is not None:
        print(f"  dicomnode vs MONAI: {ratio:.1f}x (target >= {TARGET:g}x): "
              f"{'PASS' if ratio >= TARGET and same else 'MISS'}; "
              f"{med['dicomnode'] / med['bytes floor']:.1f}x the bytes floor")
    return {"input": name, "slices": len(files), "rows": rows, "cols": cols, "runs": runs,
            "median_s": med, "runs_s": times, "dicomnode_vs_monai": ratio, "target": TARGET,
            "same_voxels_monai": same_monai, "same_voxels_pydicom_loop": same_loop,
            "passed": passed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="8 slices of 64x64, 1 run, no real data (checks the bench works)")
    args = parser.parse_args()
    size = 512
    if args.smoke:
        args.runs, args.slices, size = 1, 8, 64
    warnings.filterwarnings("ignore", module="monai")
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    results = []
    if args.smoke:
        print("smoke mode: the real chest CT is not loaded; timings are not judged")
    elif CHEST.is_dir():
        results.append(bench("real chest CT (TCIA Lung-PET-CT-Dx)", CHEST, args.runs))
    else:
        print(f"(skipped: {CHEST} not present)")
    with tempfile.TemporaryDirectory() as tmp:
        make_ct_series(Path(tmp), n_slices=args.slices, rows=size, cols=size)
        results.append(bench(f"synthetic CT {args.slices} slices", Path(tmp), args.runs,
                             timing_target=not args.smoke))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"smoke": args.smoke, "results": results}, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
