#!/usr/bin/env python3
"""Audit trail benchmark: records per second through ``AuditTrail.append`` + ``flush``.

    .venv/bin/python bench/audit.py [--records 50000] [--tmp DIR] [--out bench/results/audit.json]
    .venv/bin/python bench/audit.py --smoke --out /tmp/audit.json   # seconds: checks it works

Bodies are ~500-byte JSON audit messages shaped like PS3.15 A.5 "DICOM Instances
Transferred" events. Each case runs on a fresh trail and key folder; the clock runs
from the first ``append`` to the return of ``flush()`` (everything encrypted, chained,
written and fdatasync'd). Cases:

* group commit, 1 thread and 4 threads (the node's configuration);
* baseline ``sync=True`` on every record (one fdatasync per record, what a naive
  durable log does), on fewer records;
* baseline raw: the same JSON bytes appended to a plain file, one fsync at the end
  (no encryption, no chain: the upper bound of the disk path).

``--smoke`` (tests/test_bench_smoke.py): 400 records, 20 with ``sync=True``; every case.

This is a benchmark, not a test: it prints a table and writes JSON, never fails on a
timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.audit.keys import Keyring  # noqa: E402
from dicomnode.audit.trail import AuditTrail  # noqa: E402
from dicomnode.audit.verify import read, verify  # noqa: E402


def event(i: int) -> dict:
    """A ~500-byte audit message (PS3.15 A.5.3.7 shape); names are synthetic."""
    return {
        "EventIdentification": {"EventID": "110104", "EventActionCode": "C",
                                "EventOutcomeIndicator": "0",
                                "EventDateTime": datetime.now(UTC).isoformat()},
        "ActiveParticipant": [{"UserID": "CT_SCANNER_3", "NetworkAccessPointID": "10.1.2.3",
                               "RoleIDCode": "110153", "UserIsRequestor": True}],
        "AuditSourceIdentification": {"AuditSourceID": "ai-node-01"},
        "ParticipantObjectIdentification": [
            {"ParticipantObjectID": f"1.2.826.0.1.3680043.8.498.{i}.{i * 7919}",
             "ParticipantObjectTypeCode": "2"},
            {"ParticipantObjectID": f"PAT{i % 977:08d}", "ParticipantObjectName": "DOE^JANE",
             "ParticipantObjectTypeCode": "1"}],
    }


def case_trail(tmp: Path, n: int, threads: int, *, sync: bool = False) -> dict:
    keys = Keyring.init(tmp / "keys")
    bodies = [event(i) for i in range(n)]
    size = sum(len(json.dumps(b, separators=(",", ":"))) for b in bodies) / n
    trail = AuditTrail(tmp / "audit", keys)
    per = n // threads

    def work(k: int) -> None:
        for b in bodies[k * per:(k + 1) * per]:
            trail.append(b, sync=sync)

    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    appended = time.perf_counter() - start
    trail.flush()
    elapsed = time.perf_counter() - start
    trail.close()
    total = per * threads
    assert sum(1 for _ in read(tmp / "audit", keys)) == total, "records lost"
    assert verify(tmp / "audit", keys.public_keys).ok, "trail does not verify"
    disk = sum(p.stat().st_size for p in (tmp / "audit").glob("audit-*.log"))
    return {"records": total, "threads": threads, "sync_each": sync, "body_bytes": round(size),
            "seconds": round(elapsed, 3), "records_per_s": round(total / elapsed),
            "append_us": round(appended / per * 1e6, 1), "disk_bytes_per_record": round(disk / total)}


def case_raw(tmp: Path, n: int) -> dict:
    bodies = [json.dumps(event(i), separators=(",", ":")).encode() + b"\n" for i in range(n)]
    start = time.perf_counter()
    fd = os.open(tmp / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for b in bodies:
        os.write(fd, b)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    return {"records": n, "threads": 1, "sync_each": False, "body_bytes": round(len(bodies[0])),
            "seconds": round(elapsed, 3), "records_per_s": round(n / elapsed),
            "append_us": round(elapsed / n * 1e6, 1), "disk_bytes_per_record": len(bodies[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--sync-records", type=int, default=2_000)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (on the disk to measure)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit.json")
    parser.add_argument("--smoke", action="store_true",
                        help="400 records, 20 synced (checks the bench works)")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.sync_records = 400, 20
    cases = [("group commit, 1 thread", lambda d: case_trail(d, args.records, 1)),
             ("group commit, 4 threads", lambda d: case_trail(d, args.records, 4)),
             ("baseline: sync=True each record, 1 thread",
              lambda d: case_trail(d, args.sync_records, 1, sync=True)),
             ("baseline: sync=True each record, 4 threads",
              lambda d: case_trail(d, args.sync_records, 4, sync=True)),
             ("baseline: raw JSON lines, no crypto/chain, 1 fsync", lambda d: case_raw(d, args.records))]
    results = []
    print(f"{'case':<52} {'records':>8} {'rec/s':>9} {'append µs':>10} {'B/rec':>6}")
    for name, run in cases:
        scratch = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.tmp))
        try:
            r = run(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        r["case"] = name
        results.append(r)
        print(f"{name:<52} {r['records']:>8} {r['records_per_s']:>9} {r['append_us']:>10} "
              f"{r['disk_bytes_per_record']:>6}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": datetime.now(UTC).isoformat(),
                                    "machine": platform.platform(), "cpus": os.cpu_count(),
                                    "smoke": args.smoke, "results": results}, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
