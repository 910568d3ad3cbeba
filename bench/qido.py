"""QIDO-RS latency on a node holding many studies, and the cost of the receive path's
header scan that feeds it.

    .venv/bin/python bench/qido.py [--studies 50] [--instances 20] [--repeats 20]
                                   [--out FILE.json] [--smoke]

A DICOMweb application (the same ``make_app`` the node serves) runs in this process on
a loopback port; ``--studies`` synthetic studies (``--instances`` 32x32 CT slices each,
distinct patients, dates and descriptions) are stored through STOW-RS. Then each query
below is timed over HTTP with one keep-alive client: ``cold`` is the first request of a
freshly started application on the same storage (nothing cached in memory), ``warm``
the median of ``--repeats`` requests. Alongside, ``read_header`` (ingest's scan of each
received data set) is timed on the chest CT of ../shared (when present) and on a
synthetic 512x512 slice: microseconds per call, the median of several loops.

Prints a table and writes JSON with ``--out``. Never asserts on a timing.
``--smoke``: 3 studies of 2 instances, 2 repeats (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402

from dicomnode.config import parse_config  # noqa: E402
from dicomnode.core.index import Index  # noqa: E402
from dicomnode.http import make_app  # noqa: E402
from dicomnode.ingest.header import read_header  # noqa: E402
from dicomnode.ingest.spool import Spool  # noqa: E402
from dicomnode.synthetic import make_ct_series  # noqa: E402
from dicomnode.web.server import serve_in_thread  # noqa: E402

CHEST = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx"
NAMES = ["DOE^JOHN", "SMITH^ANNA", "MÜLLER^JÜRGEN", "GARCIA^LUIS", "NGUYEN^MAI"]


def _populate(root: Path, scratch: Path, studies: int, instances: int) -> dict[str, Any]:
    """Store the synthetic studies through STOW-RS; returns facts the queries use."""
    spool, index = Spool(root), Index(Index.path_for(root))
    app = make_app(parse_config({"storage": str(root)}), spool, index)
    handle = serve_in_thread(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{handle.port}/dicom-web"
    first_study = ""
    try:
        for s in range(studies):
            files = make_ct_series(scratch / f"s{s}", instances, 32, 32, seed=s)
            parts = []
            for f in files:
                ds = pydicom.dcmread(f)
                ds.PatientName = NAMES[s % len(NAMES)] + f"{s:03d}"
                ds.PatientID = f"PID{s:04d}"
                ds.StudyDate = f"2024{1 + s % 12:02d}{1 + s % 28:02d}"
                ds.StudyTime = f"{8 + s % 10:02d}3000"
                ds.AccessionNumber = f"ACC{s:05d}"
                ds.StudyDescription = "CT CHEST" if s % 2 else "CT ABDOMEN"
                ds.SpecificCharacterSet = "ISO_IR 192"
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                parts.append(buf.getvalue())
                first_study = first_study or str(ds.StudyInstanceUID)
            body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                            for p in parts) + b"--b--\r\n"
            r = httpx.post(url + "/studies", content=body, timeout=120, headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
            r.raise_for_status()
    finally:
        handle.stop()
        index.close()
    return {"study": first_study}


def _time_queries(root: Path, facts: dict[str, Any], repeats: int) -> dict[str, Any]:
    study = facts["study"]
    queries = {
        "all studies": "/studies",
        "all studies, limit 10": "/studies?limit=10&offset=10",
        "PatientName wildcard": "/studies?PatientName=doe*",
        "StudyDate range": "/studies?StudyDate=20240301-20240630",
        "ModalitiesInStudy=CT": "/studies?ModalitiesInStudy=CT",
        "series of a study": f"/studies/{study}/series",
        "instances of a study": f"/studies/{study}/instances",
    }
    out: dict[str, Any] = {}
    for name, path in queries.items():
        spool, index = Spool(root), Index(Index.path_for(root))
        app = make_app(parse_config({"storage": str(root)}), spool, index)
        handle = serve_in_thread(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{handle.port}/dicom-web"
        try:
            with httpx.Client(timeout=60) as client:
                t0 = time.perf_counter()
                r = client.get(url + path)
                cold = time.perf_counter() - t0
                r.raise_for_status()
                n = len(r.json()) if r.status_code == 200 else 0
                warm = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    client.get(url + path).raise_for_status()
                    warm.append(time.perf_counter() - t0)
        finally:
            handle.stop()
            index.close()
        out[name] = {"results": n, "cold_ms": cold * 1e3,
                     "warm_ms": statistics.median(warm) * 1e3}
    return out


def _header_cost(scratch: Path, loops: int) -> dict[str, Any]:
    """Microseconds per read_header call (median over ``loops`` passes)."""
    from pydicom.filereader import _read_file_meta_info

    def datasets(paths: list[Path]) -> list[tuple[bytes, str]]:
        out = []
        for p in paths:
            raw = p.read_bytes()
            bio = io.BytesIO(raw)
            bio.seek(132)
            meta = _read_file_meta_info(bio)
            out.append((raw[bio.tell():], str(meta.TransferSyntaxUID)))
        return out

    cases: dict[str, list[tuple[bytes, str]]] = {
        "synthetic 512x512 CT": datasets(make_ct_series(scratch / "hdr", 8, 512, 512)),
    }
    if CHEST.is_dir():
        cases["chest CT (Philips, implicit VR)"] = datasets(sorted(CHEST.rglob("*.dcm")))
    out: dict[str, Any] = {}
    for name, data in cases.items():
        per_pass = []
        for _ in range(loops):
            t0 = time.perf_counter()
            for raw, ts in data:
                read_header(raw, ts)
            per_pass.append((time.perf_counter() - t0) / len(data))
        out[name] = {"files": len(data), "us_per_call": statistics.median(per_pass) * 1e6,
                     "us_per_call_best": min(per_pass) * 1e6}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.studies, args.instances, args.repeats = 3, 2, 2
    with tempfile.TemporaryDirectory(prefix="bench-qido-") as tmp:
        root, scratch = Path(tmp) / "storage", Path(tmp) / "src"
        t0 = time.perf_counter()
        facts = _populate(root, scratch, args.studies, args.instances)
        stored = time.perf_counter() - t0
        queries = _time_queries(root, facts, args.repeats)
        headers = _header_cost(scratch, 3 if args.smoke else 50)
    report = {"studies": args.studies, "instances_per_study": args.instances,
              "store_seconds": stored, "queries": queries, "read_header": headers}
    print(f"{args.studies} studies x {args.instances} instances stored in {stored:.1f} s")
    print(f"{'query':28s} {'results':>7s} {'cold ms':>9s} {'warm ms':>9s}")
    for name, q in queries.items():
        print(f"{name:28s} {q['results']:7d} {q['cold_ms']:9.2f} {q['warm_ms']:9.2f}")
    for name, h in headers.items():
        print(f"read_header, {name}: {h['us_per_call']:.1f} us per call, best pass"
              f" {h['us_per_call_best']:.1f} us ({h['files']} files)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
