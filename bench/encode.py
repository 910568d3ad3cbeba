"""How long encoding a result takes: DICOM-SEG + TID 1500 SR of a 512x512x300 CT.

    .venv/bin/python bench/encode.py                 # 2 and 5 segments, 3 timed runs each
    .venv/bin/python bench/encode.py --repeats 5 --validate --out bench/results/encode.json
    .venv/bin/python bench/encode.py --smoke --out /tmp/encode.json   # seconds: checks it works

A synthetic 300-slice 512x512 CT (``dicomnode.synthetic.make_ct_series``) is written to
a scratch folder; its lungs (threshold) are the labels: 2 segments (right/left lung) or
5 (the lungs cut into upper/lower and upper/middle/lower thirds along z). After one
warm-up run, ``encode_seg`` and ``encode_sr`` are timed ``--repeats`` times and the
median is printed, with the SEG's frame count and size. Empty frames are kept (see
``dicomnode.encode.seg``); the table also shows how many frames are empty and what
omitting them would save. ``--validate`` also times ``check_object`` (write, read back
with highdicom, dciodvfy) on each object, as export does.

``--smoke`` (tests/test_bench_smoke.py): 8 slices of 64x64, 1 timed run, with
``--validate``; dciodvfy is skipped with a message where it is not installed.

A benchmark, not a test: it asserts nothing about time.
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

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.core.manifest import Code, Label, Manifest, load_manifest  # noqa: E402
from dicomnode.encode.base import EncodeInput  # noqa: E402
from dicomnode.encode.seg import encode_seg  # noqa: E402
from dicomnode.encode.sr import encode_sr  # noqa: E402
from dicomnode.encode.validate import check_object, dciodvfy_available  # noqa: E402
from dicomnode.inference.volume import load_series  # noqa: E402
from dicomnode.synthetic import make_ct_series  # noqa: E402

HU = "[hnsf'U]"
LUNG = load_manifest(ROOT / "models" / "lung_density")


def five_segment_manifest() -> Manifest:
    anat = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
    parts = [("right upper lobe", "45653009", "Upper lobe of right lung"),
             ("right lower lobe", "266005", "Lower lobe of right lung"),
             ("left upper lobe", "44714003", "Upper lobe of left lung"),
             ("left middle third", "39607008", "Lung"),
             ("left lower lobe", "41224006", "Lower lobe of left lung")]
    return Manifest(name="lung_parts_bench", version="0.0", runtime="builtin", labels=tuple(
        Label(value=i, name=name, category=anat, type=Code(value=code, scheme="SCT", meaning=meaning))
        for i, (name, code, meaning) in enumerate(parts, start=1)))


def make_inputs(folder: Path, slices: int = 300, size: int = 512) -> tuple[EncodeInput, EncodeInput]:
    paths = make_ct_series(folder, n_slices=slices, rows=size, cols=size)
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    source_paths = tuple(by_uid[u] for u in volume.sop_instance_uids)
    n, rows, cols = volume.shape
    lung = volume.array < -500
    lung[:, :, :] &= _inside_body(volume.array)
    right = np.zeros_like(lung)
    right[:, :, : cols // 2] = True  # LPS: low column index = patient's right
    two = np.where(lung & right, 1, np.where(lung, 2, 0)).astype(np.uint8)
    z = np.arange(n)[:, None, None]
    five = np.zeros_like(two)
    five[(two == 1) & (z >= n // 2)] = 1
    five[(two == 1) & (z < n // 2)] = 2
    five[(two == 2) & (z >= 2 * n // 3)] = 3
    five[(two == 2) & (z >= n // 3) & (z < 2 * n // 3)] = 4
    five[(two == 2) & (z < n // 3)] = 5

    def measures(labels: np.ndarray, manifest: Manifest) -> dict[str, dict[str, tuple[float, str]]]:
        out = {}
        for label in manifest.labels:
            hu = volume.array[labels == label.value]
            out[label.name] = {"volume": (float(hu.size * volume.voxel_volume_ml), "ml"),
                               "mean density": (float(hu.mean()), HU),
                               "LAA%-950": (float(100 * (hu < -950).mean()), "%"),
                               "PD15": (float(np.percentile(hu, 15)), HU)}
        return out

    common = dict(source_paths=source_paths, study_uid=volume.study_uid, series_uid=volume.series_uid)
    return (EncodeInput(labels=two, manifest=LUNG, measurements=measures(two, LUNG), **common),
            EncodeInput(labels=five, manifest=five_segment_manifest(),
                        measurements=measures(five, five_segment_manifest()), **common))


def _inside_body(array: np.ndarray) -> np.ndarray:
    # air outside the phantom is -1000 at the in-plane border; the lungs are enclosed
    body = array > -500
    rows = np.maximum.accumulate(body, axis=1) & np.maximum.accumulate(body[:, ::-1], axis=1)[:, ::-1]
    cols = np.maximum.accumulate(body, axis=2) & np.maximum.accumulate(body[:, :, ::-1], axis=2)[:, :, ::-1]
    return rows & cols


def timed(fn, repeats: int):  # type: ignore[no-untyped-def]
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validate", action="store_true", help="also time check_object on each object")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic CT")
    parser.add_argument("--smoke", action="store_true",
                        help="8 slices of 64x64, 1 timed run, --validate (checks the bench works)")
    args = parser.parse_args()
    size = 512
    if args.smoke:
        args.repeats, args.slices, args.validate, size = 1, 8, True, 64
    if args.validate and not dciodvfy_available():
        print("skipping dciodvfy in --validate: it is not installed (dicom3tools; "
              "scripts/install-system-deps installs it)")

    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="dicomnode-bench-encode-") as tmp:
        print(f"writing a {args.slices}-slice {size}x{size} synthetic CT ...", flush=True)
        inputs = make_inputs(Path(tmp) / "ct", args.slices, size)
        rows = []
        for inp in inputs:
            nseg = len(inp.manifest.labels)
            seg, t_seg, seg_runs = timed(lambda inp=inp: encode_seg(inp), args.repeats)
            sr, t_sr, sr_runs = timed(lambda inp=inp, seg=seg: encode_sr(inp, seg), args.repeats)
            path = Path(tmp) / f"seg{nseg}.dcm"
            seg.save_as(path, enforce_file_format=True)
            frames = int(seg.NumberOfFrames)
            frame_bytes = int(seg.Rows) * int(seg.Columns) // 8
            empty = sum(1 for s in range(1, nseg + 1) for k in range(inp.labels.shape[0])
                        if not (inp.labels[k] == inp.manifest.labels[s - 1].value).any())
            row = {"segments": nseg, "slices": inp.labels.shape[0], "encode_seg_s": t_seg,
                   "encode_sr_s": t_sr, "total_s": t_seg + t_sr, "seg_runs_s": seg_runs,
                   "sr_runs_s": sr_runs, "frames": frames, "empty_frames": empty,
                   "seg_file_mb": path.stat().st_size / 1e6,
                   "saved_if_empty_omitted_mb": empty * frame_bytes / 1e6}
            if args.validate:
                started = time.perf_counter()
                problems = check_object(path) + check_object(sr)
                row["check_object_s"] = time.perf_counter() - started
                row["problems"] = problems
            rows.append(row)

    print(f"\nencode on {platform.processor() or platform.machine()}, median of {args.repeats} warm runs"
          f"{'' if dciodvfy_available() or not args.validate else ' (dciodvfy not installed)'}")
    print(f"{'segments':>8} {'encode_seg':>10} {'encode_sr':>9} {'total':>7} {'frames':>6} "
          f"{'empty':>5} {'SEG MB':>7} {'omit-empty MB':>13}" + (f" {'check':>7}" if args.validate else ""))
    for r in rows:
        print(f"{r['segments']:>8} {r['encode_seg_s']:>9.2f}s {r['encode_sr_s']:>8.3f}s "
              f"{r['total_s']:>6.2f}s {r['frames']:>6} {r['empty_frames']:>5} {r['seg_file_mb']:>7.1f} "
              f"{r['seg_file_mb'] - r['saved_if_empty_omitted_mb']:>13.1f}"
              + (f" {r['check_object_s']:>6.2f}s" if args.validate else ""))
        if r.get("problems"):
            print("   problems:", *r["problems"], sep="\n   ")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"repeats": args.repeats, "smoke": args.smoke,
                                        "dciodvfy": dciodvfy_available(), "results": rows},
                                       indent=2))
        print(f"\nwritten: {args.out}")
    return 1 if any(r.get("problems") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
