"""STOW-RS ingest against C-STORE ingest of the same data, in the same run.

    .venv/bin/python bench/stow.py [--repeats 3] [--instances 300] [--out FILE.json] [--smoke]

One node (fsync on, as shipped) is started per measurement. C-STORE: DCMTK storescu
(TCP_NODELAY=1), one association. STOW-RS: dicomweb-client, one multipart request
per batch of instances. Both sides send the synthetic 300-slice 512x512 CT series
(and the real chest CT when ../shared is present); each run is verified (every
instance stored). Prints instances/s and the STOW/C-STORE ratio (and writes them as
JSON with ``--out``). Never asserts on a timing. Without DCMTK's storescu the C-STORE
baseline is skipped with a message. ``--smoke``: 6 small instances, 1 repeat, no
real data: only shows that the bench works (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.synthetic import make_ct_series  # noqa: E402

CHEST = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port, self.http_port = _free_port(), _free_port()
        self.storage = workdir / "storage"
        cfg = {"bind_address": "127.0.0.1", "port": self.port, "storage": str(self.storage),
               "http": {"port": self.http_port}, "routing": [],  # ingest only
               "log_level": "WARNING"}
        self.config = workdir / "node.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Node:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        import urllib.request

        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"node did not start:\n{self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stored(self) -> int:
        return sum(1 for _ in (self.storage / "studies").rglob("*.dcm"))


def cstore(node: Node, files: list[Path]) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                    *map(str, files)], env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def stow(node: Node, files: list[Path], batch: int) -> float:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicom-web")
    datasets = [pydicom.dcmread(f) for f in files]  # read before the clock starts
    start = time.perf_counter()
    for i in range(0, len(datasets), batch):
        client.store_instances(datasets[i : i + batch])
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--instances", type=int, default=300)
    p.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="6 small instances, 1 repeat, no real data (checks the bench works)")
    args = p.parse_args()
    size = 512
    if args.smoke:
        args.repeats, args.instances, args.batch, size = 1, 6, 4, 64
    protocols = ["C-STORE", "STOW-RS"]
    if shutil.which("storescu") is None:
        print("skipping the C-STORE baseline: storescu (DCMTK) is not installed "
              "(scripts/install-system-deps installs it)")
        protocols.remove("C-STORE")
    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-stow-bench-"))
    report: list[dict[str, object]] = []
    try:
        sets = {"synthetic-ct": make_ct_series(scratch / "synthetic", args.instances, size, size)}
        if CHEST.exists() and not args.smoke:
            sets["tcia-lung-chest-ct"] = sorted(CHEST.rglob("*.dcm"))
        print(f"{'dataset':22} {'protocol':9} {'inst/s':>8}   runs")
        for name, files in sets.items():
            rates: dict[str, list[float]] = {proto: [] for proto in protocols}
            for rep in range(args.repeats):
                for protocol in protocols:  # interleaved
                    work = scratch / f"{name}-{protocol}-{rep}"
                    work.mkdir()
                    with Node(work) as node:
                        seconds = (cstore(node, files) if protocol == "C-STORE"
                                   else stow(node, files, args.batch))
                        if node.stored() != len(files):
                            print(f"!!! {protocol} stored {node.stored()} of {len(files)}")
                            return 1
                    rates[protocol].append(len(files) / seconds)
                    shutil.rmtree(work, ignore_errors=True)
            medians = {proto: statistics.median(values) for proto, values in rates.items()}
            for protocol, values in rates.items():
                print(f"{name:22} {protocol:9} {medians[protocol]:8.1f}   "
                      + " ".join(f"{v:.0f}" for v in values))
            ratio = (medians["STOW-RS"] / medians["C-STORE"]) if "C-STORE" in medians else None
            if ratio is not None:
                print(f"{name:22} STOW-RS / C-STORE = {ratio:.2f}x")
            report.append({"dataset": name, "instances": len(files), "runs_per_s": rates,
                           "instances_per_s": medians, "stow_over_cstore": ratio})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"repeats": args.repeats, "batch": args.batch,
                                        "smoke": args.smoke, "results": report}, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
