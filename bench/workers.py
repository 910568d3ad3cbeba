#!/usr/bin/env python3
"""Remote workers: studies per minute through one node with 1, 2 and 4 workers, and the
per-job overhead the broker adds compared with the node's in-process worker, in one run.

    .venv/bin/python bench/workers.py [--smoke] [--studies N] [--workers 1,2,4]
                                      [--slices 300] [--size 512] [--out FILE]

Everything runs on this machine over loopback (CPU): a redis-server (AOF on), DCMTK
storescp as the PACS, one ``dicomnode serve`` and ``dicomnode worker`` processes started
from folders of their own. The studies are the synthetic CT (``dicomnode.synthetic``,
300 slices of 512 x 512 by default), the model ``lung_density``, the destination gets SEG
and SR. For each configuration a fresh node (and fresh workers, models warm, "consuming"
logged) is started before the clock starts.

* **baseline**: ``queue.backend: sqlite``, the node's own in-process worker (models
  preloaded). A first study warms the whole path up (not measured, in every
  configuration); then studies are sent one at a time (each job's wall time: job added -> job done,
  from the node's jobs database), then all at once (throughput).
* **celery, k workers**: ``queue.backend: celery``; with k = 1 also one study at a time
  (the per-job overhead = median remote job wall - median in-process job wall: hand-off,
  claim, volume transfer, upload, on top of the same load/model/encode work), then all
  ``--studies`` at once, in one association (the node completes a study when the
  association that brought it is released, so the jobs are all added at one instant):
  studies per minute = studies / (first job added -> last job done).

Each worker gets ``OMP_NUM_THREADS = max(1, cpus // k)`` so that k workers share the
CPUs instead of oversubscribing them; on a GPU site each worker has its own GPU and the
figure scales with the GPUs, not the CPUs. ``--smoke`` runs a tiny version (studies of
40 slices of 128 x 128, workers 1 and 2) in about a minute.

This is a benchmark, not a test: it prints a table and writes JSON, and exits 1 only when
a study did not come back as SEG + SR (then the timings mean nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "bench" / "results" / "workers.json"
TOKEN = "bench-worker-token-0123456789abcdef"
MODEL = "lung_density"
ENV = {**os.environ, "TCP_NODELAY": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Proc:
    """A child process with its log in a file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
                 ) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=env or ENV)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- the pieces -----------------------------------------------------------------------------


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    folder.mkdir(parents=True)
    port = free_port()
    (folder / "redis.conf").write_text(
        f"bind 127.0.0.1\nport {port}\ndir {folder}\nappendonly yes\nappendfsync everysec\n"
        'save ""\n')
    proc = Proc(["redis-server", str(folder / "redis.conf")], folder / "redis.log", folder)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=1)
    wait_until(lambda: _ping(client), 15, "redis-server")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@contextmanager
def receiver(folder: Path) -> Iterator[tuple[int, Path]]:
    out = folder / "received"
    out.mkdir(parents=True)
    port = free_port()
    proc = Proc(["storescp", "-aet", "PACS", "-uf", "-od", str(out), str(port)],
                folder / "storescp.log", folder)
    wait_until(lambda: subprocess.run(["echoscu", "-aec", "PACS", "127.0.0.1", str(port)],
                                      env=ENV, capture_output=True).returncode == 0,
               15, "storescp")
    try:
        yield port, out
    finally:
        proc.stop()


class Node:
    def __init__(self, folder: Path, pacs_port: int, broker: str | None) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.port, self.http_port = free_port(), free_port()
        self.storage = folder / "storage"
        cfg: dict[str, Any] = {
            "ae_title": "NODE", "bind_address": "127.0.0.1", "port": self.port,
            "storage": str(self.storage), "models_dir": str(ROOT / "models"),
            # a study completes when the association that brought it is released: the
            # batch, sent in one association, becomes jobs all at the same instant
            "completion": {"quiet_seconds": 3600, "on_association_release": True},
            "http": {"port": self.http_port},
            "audit": {"enabled": False},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": pacs_port, "objects": ["seg", "sr"]}],
            "routing": [{"name": "ct", "model": MODEL, "destinations": ["pacs"],
                         "match": {"modality": ["CT"]}}],
            "inference": {"device": "cpu", "lease_seconds": 120},
        }
        if broker is not None:
            cfg["queue"] = {"backend": "celery", "url": broker,
                            "visibility_timeout_seconds": 3600,
                            "worker_tokens": [{"name": "bench", "sha256":
                                               hashlib.sha256(TOKEN.encode()).hexdigest()}]}
        (folder / "node.yaml").write_text(yaml.safe_dump(cfg))
        self.proc = Proc([sys.executable, "-m", "dicomnode", "serve", "--config",
                          str(folder / "node.yaml")], folder / "node.log", folder)
        wait_until(lambda: "ready on" in self.log() or self.proc.proc.poll() is not None, 300,
                   "node start")
        if self.proc.proc.poll() is not None:
            raise RuntimeError(f"node exited:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.proc.log()

    def jobs(self) -> list[tuple[int, str, float, float, dict[str, Any] | None]]:
        db = self.storage / "jobs.sqlite3"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT id, state, created_at, updated_at, result FROM jobs"
                                " ORDER BY id").fetchall()
        finally:
            conn.close()
        return [(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None) for r in rows]

    def stop(self) -> None:
        self.proc.stop()


def start_workers(base: Path, k: int, broker: str, node: Node) -> list[Proc]:
    threads = max(1, (os.cpu_count() or 1) // k)
    procs = []
    for i in range(k):
        folder = base / f"worker{i + 1}"
        (folder / "models").mkdir(parents=True)
        shutil.copytree(ROOT / "models" / MODEL, folder / "models" / MODEL)
        (folder / "worker.yaml").write_text(yaml.safe_dump({
            "queue": {"backend": "celery", "url": broker, "visibility_timeout_seconds": 3600},
            "worker": {"node_url": f"http://127.0.0.1:{node.http_port}", "token": TOKEN,
                       "models": [MODEL], "name": f"w{i + 1}"},
            "models_dir": "models", "inference": {"device": "cpu"}, "log_level": "INFO"}))
        env = {**ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        procs.append(Proc([sys.executable, "-m", "dicomnode", "worker", "--config",
                           "worker.yaml", "--storage", "storage"], folder / "worker.log",
                          folder, env))
    for p in procs:
        wait_until(lambda p=p: "consuming" in p.log() or p.proc.poll() is not None, 300,
                   "worker start")
        if p.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{p.log()[-3000:]}")
    return procs


def send(node: Node, *folders: Path) -> None:
    """Every file of ``folders`` in one association (storescu)."""
    files = [str(p) for folder in folders for p in sorted(folder.glob("*.dcm"))]
    r = subprocess.run(["storescu", "-aec", "NODE", "127.0.0.1", str(node.port), *files],
                       env=ENV, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")


def wait_done(node: Node, n: int, timeout: float) -> list[Any]:
    def done() -> list[Any] | None:
        jobs = node.jobs()
        finished = [j for j in jobs if j[1] in ("done", "failed")]
        return jobs if len(finished) >= n else None

    jobs = wait_until(done, timeout, f"{n} job(s) done", interval=0.5)
    failed = [j for j in jobs if j[1] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed:\n{node.log()[-3000:]}")
    return list(jobs)


def delivered(out: Path) -> dict[str, int]:
    import pydicom

    counts: dict[str, int] = {}
    for path in out.iterdir():
        try:
            m = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
                    .Modality)
        except Exception:  # storescp is still writing it
            continue
        counts[m] = counts.get(m, 0) + 1
    return counts


# -- where a remote job's time goes (from the logs) ---------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _when(line: str) -> float | None:
    m = _STAMP.match(line)
    if m is None:
        return None
    return time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + \
        int(m.group(1)[20:]) / 1000.0


def phases(node_log: str, worker_logs: list[str]) -> dict[str, float]:
    """Medians over the jobs of the steps only a remote job has: the hand-off (job added ->
    claimed by a worker), the volume's trip (the worker's fetch time minus the node's series
    loading), and the way back (the node reading and storing the result)."""
    added: dict[str, float] = {}
    claimed: dict[str, float] = {}
    loaded: dict[str, float] = {}
    back: dict[str, float] = {}
    fetched: dict[str, float] = {}
    for line in node_log.splitlines():
        at = _when(line)
        if at is None:
            continue
        if m := re.search(r"job (\d+) added:", line):
            added[m.group(1)] = at
        elif m := re.search(r"job (\d+) \(\S+\) claimed by worker", line):
            claimed[m.group(1)] = at
        elif m := re.search(r"job (\d+): volume \S+ \(\w+\) sent to worker", line):
            loaded[m.group(1)] = at
        elif m := re.search(r"job (\d+) done by worker .*result read in ([\d.]+) s, checked"
                            r" and stored in ([\d.]+) s", line):
            back[m.group(1)] = float(m.group(2)) + float(m.group(3))
    for log in worker_logs:
        for m in re.finditer(r"job (\d+): \S+ ran in [\d.]+ s on \S+ \(input fetched in"
                             r" ([\d.]+) s\)", log):
            fetched[m.group(1)] = float(m.group(2))
    jobs = sorted(set(claimed) & set(added) & set(loaded) & set(fetched) & set(back))
    if not jobs:
        return {}
    return {
        "handoff_s": statistics.median(claimed[j] - added[j] for j in jobs),
        "volume_trip_s": statistics.median(fetched[j] - (loaded[j] - claimed[j]) for j in jobs),
        "result_trip_s": statistics.median(back[j] for j in jobs),
        "jobs": len(jobs),
    }


# -- one configuration ------------------------------------------------------------------------


def run_config(label: str, base: Path, studies: list[Path], sequential: int,
               broker: str | None, k: int, timeout: float) -> dict[str, Any]:
    """``studies[0]`` warms the whole path up (not measured), the next ``sequential`` go
    one at a time, the rest all at once."""
    base.mkdir(parents=True)
    with receiver(base) as (pacs_port, out):
        node = Node(base / "node", pacs_port, broker)
        workers = start_workers(base, k, broker, node) if broker is not None else []
        try:
            walls, models = [], []
            for i, study in enumerate(studies[: sequential + 1]):  # one at a time
                send(node, study)
                jobs = wait_done(node, i + 1, timeout)
                _, _, created, updated, result = jobs[i]
                if i:
                    walls.append(updated - created)
                    models.append(float((result or {}).get("model_seconds", 0.0)))
            if studies[sequential + 1 :]:  # all at once: one association
                send(node, *studies[sequential + 1 :])
            jobs = wait_done(node, len(studies), timeout)
            batch = jobs[sequential + 1 :]
            elapsed = max(j[3] for j in batch) - min(j[2] for j in batch) if batch else 0.0
            counts = wait_until(lambda: (c := delivered(out)) and c.get("SEG", 0) >= len(
                studies) and c.get("SR", 0) >= len(studies) and c, 120, "SEG + SR delivered")
        finally:
            for w in workers:
                w.stop()
            node.stop()
        steps = phases(node.log(), [w.log() for w in workers]) if workers else {}
    return {
        "remote_steps": steps,
        "config": label, "workers": k, "studies": len(studies) - 1, "sequential": sequential,
        "job_wall_s": walls, "model_s": models,
        "batch_studies": len(batch), "batch_elapsed_s": elapsed,
        "studies_per_min": (len(batch) / elapsed * 60.0) if elapsed else None,
        "delivered": counts,
        "one_result_set_each": counts.get("SEG") == len(studies) == counts.get("SR"),
        "worker_jobs": {f"w{i + 1}": w.log().count(" ran in ") for i, w in enumerate(workers)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (about a minute)")
    ap.add_argument("--studies", type=int, default=4, help="studies sent at once per config")
    ap.add_argument("--sequential", type=int, default=2,
                    help="studies sent one at a time first (job wall times)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.studies, args.sequential, args.workers = 2, 2, "1,2"
        args.slices, args.size = 40, 128
    ks = [int(x) for x in args.workers.split(",") if x.strip()]
    for tool in ("redis-server", "storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed (scripts/install-system-deps)",
                  file=sys.stderr)
            return 2
    from dicomnode.synthetic import make_ct_series

    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-bench-workers-", dir=args.tmp))
    results: list[dict[str, Any]] = []
    ok = True
    try:
        n = 1 + args.sequential + args.studies
        print(f"making {n} synthetic studies of {args.slices} x {args.size}^2 ...", flush=True)
        studies = [scratch / "studies" / f"s{i}" for i in range(n)]
        for i, folder in enumerate(studies):
            make_ct_series(folder, args.slices, args.size, args.size, seed=i)
        with redis_server(scratch / "redis") as broker:
            configs = [("in-process (sqlite)", None, 1, args.sequential)]
            configs += [(f"celery, {k} worker{'s' if k > 1 else ''}", broker, k,
                         args.sequential if k == ks[0] else 0) for k in ks]
            for label, url, k, seq in configs:
                use = studies if seq else studies[:1] + studies[1 + args.sequential:]
                print(f"running {label} ...", flush=True)
                r = run_config(label, scratch / label.replace(" ", "_").replace(",", ""), use,
                               seq, url, k, args.timeout)
                ok = ok and r["one_result_set_each"]
                results.append(r)
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    base = results[0]
    remote_seq = next(r for r in results[1:] if r["job_wall_s"])
    overhead = statistics.median(remote_seq["job_wall_s"]) - statistics.median(base["job_wall_s"])
    print()
    print(f"{'configuration':<24}{'studies/min':>12}{'batch s':>10}{'job wall s':>12}"
          f"{'model s':>10}")
    for r in results:
        wall = f"{statistics.median(r['job_wall_s']):.2f}" if r["job_wall_s"] else "-"
        model = f"{statistics.median(r['model_s']):.2f}" if r["model_s"] else "-"
        spm = f"{r['studies_per_min']:.2f}" if r["studies_per_min"] else "-"
        print(f"{r['config']:<24}{spm:>12}{r['batch_elapsed_s']:>10.1f}{wall:>12}{model:>10}")
    print(f"\nper-job overhead of the broker (median job wall, 1 worker vs in-process):"
          f" {overhead:+.2f} s")
    for r in results[1:]:
        st = r["remote_steps"]
        if st:
            print(f"  {r['config']}: steps only a remote job has (medians over {st['jobs']}"
                  f" jobs): hand-off {st['handoff_s']:.2f} s, volume trip"
                  f" {st['volume_trip_s']:.2f} s, result trip {st['result_trip_s']:.2f} s")
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(),
              "slices": args.slices, "size": args.size, "model": MODEL,
              "smoke": args.smoke, "results": results, "broker_overhead_s": overhead}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")
    if not ok:
        print("!!! a study did not come back as exactly one SEG + SR", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
