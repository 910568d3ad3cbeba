#!/usr/bin/env python3
"""Ingest benchmark: how fast does dicomnode take in C-STOREs, next to DCMTK's
storescp and Orthanc, and how much memory does it use doing it?

    .venv/bin/python bench/ingest.py [--quick] [--large] [--out bench/results/ingest.json]

DCMTK ``storescu`` sends the same files, in turns, to each receiver, over one
association and over four at once. Every receiver is started fresh (empty storage)
for every measurement, bound to an ephemeral port, and stopped afterwards; the
clock runs from the first storescu start to the last storescu exit. Measurements
are repeated, interleaving the receivers, and the median is reported. After each
run the stored instances are counted: a run that lost data is reported as a
failure, whatever its speed.

This is a benchmark, not a test: it prints a table, writes JSON and marks each
target PASS or MISS, but never fails on a timing. The exit status is 1 only when
a run lost data or a receiver misbehaved (see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TCIA_DIR = ROOT.parent / "shared" / "data" / "tcia-lung-pet-ct-dx"
DEFAULT_OUT = ROOT / "bench" / "results" / "ingest.json"

# DCMTK and Orthanc crawl at ~20 instances/s on loopback without TCP_NODELAY
# (Nagle + delayed ACK on the small DIMSE command PDUs).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}

MB = 1_000_000
RSS_INTERVAL_S = 0.05
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_ERROR_WORDS = ("ERROR", "CRITICAL", "Traceback")

# Targets: (receiver compared with, associations, minimum dicomnode/other ratio)
THROUGHPUT_TARGETS: tuple[tuple[str, int, float], ...] = (
    ("storescp", 1, 0.5),
    ("storescp --fork", 4, 0.5),
    ("orthanc", 1, 3.0),
    ("orthanc", 4, 1.5),
)
RSS_TARGET_MB = 400.0


# -- small helpers -------------------------------------------------------------------


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"error: {name} is not installed (scripts/install-system-deps installs it)")
    return path


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for p in folder.rglob(pattern) if p.is_file()) if folder.exists() else 0


def split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """``items`` in ``parts`` contiguous chunks of (nearly) equal size."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return [chunk for chunk in out if chunk]


def warm_page_cache(files: Sequence[Path]) -> None:
    for path in files:
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def filesystem_of(path: Path) -> str:
    """'<fstype> on <mount point>' for the file system holding ``path``."""
    best, fstype = "", "?"
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return f"{fstype} on {best or '/'}"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


# -- processes ------------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, stdout and stderr to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the process group of ``proc`` and wait; SIGKILL what is left.

    Returns the leader's exit code, or None when it had to be killed.
    """
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    code: int | None = proc.poll()
    if code is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    _signal_group(pgid, signal.SIGKILL)  # forked children, stragglers
    if proc.poll() is None:
        proc.wait()
    return code


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (via /proc/PID/task/TID/children)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return pids


def _proc_kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kb(pid: int) -> int:
    """Resident set size (shared pages counted in full in every process)."""
    return _proc_kb(f"/proc/{pid}/status", "VmRSS:")


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split between the processes sharing them)."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


class RssSampler:
    """Samples the summed VmRSS (and PSS) of a process tree every 50 ms; keeps the peaks."""

    def __init__(self, root_pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peak_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def idle_mb(self) -> float:
        """One sample now, before the run (MB)."""
        return sum(rss_kb(p) for p in process_tree(self.root_pid)) * 1024 / MB

    def _sample(self) -> None:
        pids = process_tree(self.root_pid)
        total = sum(rss_kb(p) for p in pids)
        self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_kb(p) for p in pids))
        self.samples += 1
        if total > self.peak_kb:
            self.peak_kb, self.peak_processes = total, len(pids)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb * 1024 / MB

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss_kb * 1024 / MB


# -- receivers ------------------------------------------------------------------------


class ReceiverError(RuntimeError):
    pass


class Receiver(ABC):
    """A C-STORE SCP under test: ``start`` (returns when it answers C-ECHO),
    ``stored`` (instances it holds), ``stop``. One instance per measurement."""

    kind: str  # "dicomnode", "storescp" or "orthanc"
    ae_title: str

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    @abstractmethod
    def label(self) -> str:
        """How the table names this receiver, e.g. 'dicomnode p=4'."""

    @abstractmethod
    def command(self) -> list[str]:
        """Write any config file and return the command line."""

    @property
    def env(self) -> dict[str, str]:
        return PEER_ENV

    @abstractmethod
    def stored(self) -> int:
        """How many instances the receiver holds now."""

    def problems(self) -> list[str]:
        """Errors from its log (they fail the run)."""
        return []

    def warnings(self) -> list[str]:
        """Warnings from its log (reported, but the run still counts)."""
        return []

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.command(), self.log_path, env=self.env, cwd=self.workdir)
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll with echoscu until a C-ECHO succeeds."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReceiverError(
                    f"{self.label} exited with {self.proc.returncode} while starting:\n"
                    f"{tail(self.log_path)}"
                )
            if echo(self.port, self.ae_title):
                return
            time.sleep(0.1)
        raise ReceiverError(f"{self.label} not ready within {timeout:.0f} s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            self.exit_code = stop_group(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def echo(port: int, ae_title: str) -> bool:
    try:
        out = subprocess.run(
            ["echoscu", "-to", "2", "-ta", "2", "-aec", ae_title, "127.0.0.1", str(port)],
            capture_output=True, env=PEER_ENV, timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0


class DicomNode(Receiver):
    """``python -m dicomnode serve`` with a config written here (fsync on, as shipped)."""

    kind = "dicomnode"
    ae_title = "DICOMNODE"

    def __init__(self, workdir: Path, processes: int = 1, audit: bool = True) -> None:
        super().__init__(workdir)
        self.processes = processes
        self.audit = audit
        self.storage = workdir / "storage"
        self.config_path = workdir / "node.yaml"

    @property
    def label(self) -> str:
        return f"dicomnode p={self.processes}" + ("" if self.audit else " no-audit")

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ)  # as a user would start it: no TCP_NODELAY help

    def command(self) -> list[str]:
        config = {
            "ae_title": self.ae_title,
            "bind_address": "127.0.0.1",
            "port": self.port,
            "storage": str(self.storage),
            "ingest": {"processes": self.processes},
            "audit": {"enabled": self.audit},
            "http": {"port": 0},
            "routing": [],  # ingest only: no model runs
            "log_level": "INFO",
        }
        self.config_path.write_text(yaml.safe_dump(config))
        return [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        super().wait_ready(timeout)
        # With processes > 1 the port is listening before every receiving process
        # has started; give them (briefly) the chance to all be accepting.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.log_path.read_text(errors="replace").count("listening on") >= self.processes:
                return
            time.sleep(0.05)

    def stored(self) -> int:
        return count_files(self.storage / "studies", "*.dcm")

    def indexed(self) -> int | None:
        """Instances in the index, from ``dicomnode status --json``; None if it fails."""
        try:
            out = subprocess.run(
                [sys.executable, "-m", "dicomnode", "status", "--json",
                 "--config", str(self.config_path)],
                capture_output=True, text=True, timeout=60,
            )
            data = json.loads(out.stdout)
            return sum(int(s["instances"]) for s in data["studies"])
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            return None

    def _log_lines(self, words: Sequence[str]) -> list[str]:
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [ln for ln in text.splitlines() if any(w in ln for w in words)]

    def warnings(self) -> list[str]:
        return self._log_lines(("WARNING",))

    def problems(self) -> list[str]:
        found = self._log_lines(LOG_ERROR_WORDS)
        if self.exit_code not in (0, None):
            found.append(f"dicomnode exited with {self.exit_code} on SIGTERM")
        elif self.exit_code is None and self.proc is not None:
            found.append(f"dicomnode did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
        return found


class StoreSCP(Receiver):
    """DCMTK storescp writing every instance to a folder (it never fsyncs)."""

    kind = "storescp"
    ae_title = "STORESCP"

    def __init__(self, workdir: Path, fork: bool = False) -> None:
        super().__init__(workdir)
        self.fork = fork
        self.out_dir = workdir / "received"

    @property
    def label(self) -> str:
        return "storescp --fork" if self.fork else "storescp"

    def command(self) -> list[str]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = ["--fork"] if self.fork else []
        # -dhl: no reverse DNS lookup of the caller (dicomnode does none either)
        return ["storescp", *mode, "-aet", self.ae_title, "-dhl", "-od", str(self.out_dir),
                str(self.port)]

    def stored(self) -> int:
        return count_files(self.out_dir)


class Orthanc(Receiver):
    """Orthanc with a config written here: loopback HTTP, no plugins, defaults otherwise
    (SyncStorageArea, i.e. fsync, is on by default)."""

    kind = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.config_path = workdir / "orthanc.json"

    @property
    def label(self) -> str:
        return "orthanc"

    def command(self) -> list[str]:
        config = {
            "Name": "dicomnode-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "Plugins": [],
            "LuaScripts": [],
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        return ["Orthanc", str(self.config_path)]

    def stored(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return int(json.load(resp)["CountInstances"])
        except (OSError, ValueError, KeyError):
            return count_files(self.workdir / "storage")

    def _log_lines(self, levels: tuple[str, ...]) -> list[str]:
        if not self.log_path.exists():
            return []
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                if ln.startswith(levels)]

    def problems(self) -> list[str]:
        return self._log_lines(("E", "F"))

    # Orthanc logs its ordinary start-up and shut-down chatter at level W: not reported.


@dataclass(frozen=True)
class ReceiverSpec:
    """What to start: a receiver kind and its settings; ``make`` builds a fresh one."""

    kind: str
    processes: int = 1
    fork: bool = False
    audit: bool = True

    def make(self, workdir: Path) -> Receiver:
        if self.kind == "dicomnode":
            return DicomNode(workdir, self.processes, self.audit)
        if self.kind == "storescp":
            return StoreSCP(workdir, self.fork)
        if self.kind == "orthanc":
            return Orthanc(workdir)
        raise ValueError(self.kind)


@contextmanager
def running(receiver: Receiver) -> Iterator[Receiver]:
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


# -- sending --------------------------------------------------------------------------


@dataclass
class SendResult:
    seconds: float
    failures: int  # storescu error lines + non-zero exits + timeouts
    errors: list[str]


def send(port: int, ae_title: str, groups: Sequence[Sequence[Path]], workdir: Path,
         timeout: float) -> SendResult:
    """Start one storescu per group at once; wait for all. Times first start to last exit."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    failures, errors = 0, []
    start = time.perf_counter()
    try:
        for i, files in enumerate(groups):
            log = workdir / f"storescu-{i}.log"
            cmd = ["storescu", "-nh", "-aet", "BENCHSCU", "-aec", ae_title,
                   "127.0.0.1", str(port), *map(str, files)]
            procs.append((spawn(cmd, log, env=PEER_ENV), log))
        deadline = start + timeout
        for proc, _log in procs:
            try:
                proc.wait(max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                failures += 1
                errors.append(f"storescu still running after {timeout:.0f} s: killed")
                stop_group(proc, timeout=5)
        elapsed = time.perf_counter() - start
    finally:
        for proc, _log in procs:
            if proc.poll() is None:
                stop_group(proc, timeout=5)
    for proc, log in procs:
        if proc.returncode != 0:
            failures += 1
            errors.append(f"storescu exited with {proc.returncode}")
        bad = [ln for ln in log.read_text(errors="replace").splitlines()
               if ln.startswith(("E:", "F:"))]
        failures += len(bad)
        errors.extend(bad[:5])
    return SendResult(elapsed, failures, errors)


# -- measurements ---------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    files: list[Path]
    bytes: int = 0

    def __post_init__(self) -> None:
        self.bytes = sum(p.stat().st_size for p in self.files)


@dataclass
class Run:
    dataset: str
    associations: int
    receiver: str
    repeat: int
    instances: int
    bytes: int
    seconds: float
    stored: int
    indexed: int | None
    storescu_failures: int
    idle_rss_mb: float
    peak_rss_mb: float
    peak_pss_mb: float
    peak_rss_processes: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds


def measure(spec: ReceiverSpec, data: Dataset, associations: int, repeat: int,
            scratch: Path) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"{spec.kind}-", dir=scratch))
    receiver = spec.make(workdir)
    timeout = 120 + 0.5 * len(data.files)
    problems: list[str] = []
    warnings: list[str] = []
    stored, indexed = 0, None
    result = SendResult(float("nan"), 0, [])
    idle_mb, peak_mb, peak_pss, peak_procs = 0.0, 0.0, 0.0, 0
    try:
        with running(receiver):
            sampler = RssSampler(receiver.pid)
            idle_mb = sampler.idle_mb()
            with sampler as rss:
                result = send(receiver.port, receiver.ae_title,
                              split(data.files, associations), workdir, timeout)
            peak_mb, peak_pss, peak_procs = rss.peak_mb, rss.peak_pss_mb, rss.peak_processes
            stored = receiver.stored()
            if isinstance(receiver, DicomNode):
                indexed = receiver.indexed()
                if indexed is None:
                    problems.append("`dicomnode status --json` failed: index not checked")
    except ReceiverError as exc:
        problems.append(str(exc))
    finally:
        problems.extend(receiver.problems())
        warnings.extend(receiver.warnings())
        shutil.rmtree(workdir, ignore_errors=True)
    problems.extend(result.errors)
    expected = len(data.files)
    ok = not problems and result.failures == 0 and stored == expected and indexed in (None, expected)
    if stored != expected:
        problems.insert(0, f"DATA LOSS: {stored} of {expected} instances stored")
    if indexed is not None and indexed != expected:
        problems.insert(0, f"INDEX MISMATCH: {indexed} of {expected} instances indexed")
    return Run(data.name, associations, receiver.label, repeat, expected, data.bytes,
               result.seconds, stored, indexed, result.failures, round(idle_mb, 1),
               round(peak_mb, 1), round(peak_pss, 1), peak_procs,
               ok, problems, warnings)


@dataclass
class Summary:
    dataset: str
    associations: int
    receiver: str
    runs: int
    failed_runs: int
    median_s: float
    instances_per_s: float
    mb_per_s: float
    idle_rss_mb: float
    peak_rss_mb: float
    peak_pss_mb: float


def summarize(runs: Sequence[Run]) -> list[Summary]:
    groups: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.associations, r.receiver), []).append(r)
    out = []
    for (ds, assoc, name), rs in groups.items():
        timed = [r.seconds for r in rs if r.seconds == r.seconds]  # drop NaN (no send)
        median = statistics.median(timed) if timed else float("nan")
        out.append(Summary(
            ds, assoc, name, len(rs), sum(not r.ok for r in rs), median,
            rs[0].instances / median if timed else 0.0,
            rs[0].bytes / MB / median if timed else 0.0,
            max(r.idle_rss_mb for r in rs),
            max(r.peak_rss_mb for r in rs),
            max(r.peak_pss_mb for r in rs),
        ))
    return out


@dataclass
class Target:
    dataset: str
    what: str
    value: float
    goal: str
    passed: bool
    note: str = ""


def evaluate(summaries: Sequence[Summary]) -> list[Target]:
    by_key = {(s.dataset, s.associations, s.receiver): s for s in summaries}
    targets = []
    for ds in dict.fromkeys(s.dataset for s in summaries):
        for other, assoc, minimum in THROUGHPUT_TARGETS:
            node = by_key.get((ds, assoc, f"dicomnode p={assoc}"))
            ref = by_key.get((ds, assoc, other))
            if node is None or ref is None or not ref.instances_per_s:
                continue
            ratio = node.instances_per_s / ref.instances_per_s
            failed = [x.receiver for x in (node, ref) if x.failed_runs]
            note = f"failed runs: {', '.join(failed)}" if failed else ""
            targets.append(Target(ds, f"dicomnode p={assoc} / {other}, {assoc} assoc",
                                  round(ratio, 2), f">= {minimum}x",
                                  ratio >= minimum and not failed, note))
    for s in summaries:
        if s.dataset.startswith("large") and s.receiver.startswith("dicomnode"):
            targets.append(Target(s.dataset, f"{s.receiver} peak RSS, {s.associations} assoc",
                                  s.peak_rss_mb, f"< {RSS_TARGET_MB:g} MB",
                                  s.peak_rss_mb < RSS_TARGET_MB and not s.failed_runs,
                                  "failed runs" if s.failed_runs else
                                  f"idle {s.idle_rss_mb:.0f} MB, "
                                  f"+{s.peak_rss_mb - s.idle_rss_mb:.0f} MB while receiving"))
    return targets


# -- reporting ------------------------------------------------------------------------


def print_table(summaries: Sequence[Summary]) -> None:
    head = (f"{'dataset':<22} {'assoc':>5}  {'receiver':<16} {'inst/s':>8} {'MB/s':>8} "
            f"{'median s':>9} {'runs':>4} {'idle RSS':>9} {'peak RSS':>9} {'peak PSS':>9}  {'vs storescp':>11} {'vs orthanc':>10}")
    print(head)
    print("-" * len(head))
    by_key = {(s.dataset, s.associations, s.receiver): s for s in summaries}
    for s in summaries:
        ratios = ["", ""]
        if s.receiver.startswith("dicomnode"):
            ref_scp = "storescp --fork" if s.associations > 1 else "storescp"
            for i, ref_name in enumerate((ref_scp, "orthanc")):
                ref = by_key.get((s.dataset, s.associations, ref_name))
                if ref is not None and ref.instances_per_s:
                    ratios[i] = f"{s.instances_per_s / ref.instances_per_s:.2f}x"
        flag = "" if not s.failed_runs else f"  <-- {s.failed_runs} FAILED RUN(S)"
        print(f"{s.dataset:<22} {s.associations:>5}  {s.receiver:<16} {s.instances_per_s:>8.1f} "
              f"{s.mb_per_s:>8.1f} {s.median_s:>9.2f} {s.runs:>4} {s.idle_rss_mb:>6.0f} MB {s.peak_rss_mb:>6.0f} MB {s.peak_pss_mb:>6.0f} MB  "
              f"{ratios[0]:>11} {ratios[1]:>10}{flag}")


def print_targets(targets: Sequence[Target]) -> None:
    if not targets:
        return
    print("\nTargets (dicomnode fsyncs every instance; storescp never fsyncs):")
    for t in targets:
        value = f"{t.value:.2f}x" if t.goal.startswith(">=") else f"{t.value:.0f} MB"
        note = f"  [{t.note}]" if t.note else ""
        print(f"  {'PASS' if t.passed else 'MISS'}  {t.dataset:<22} {t.what:<44} "
              f"{value:>9}  (target {t.goal}){note}")


def print_warnings(runs: Sequence[Run]) -> None:
    warned = [r for r in runs if r.warnings]
    if not warned:
        return
    print(f"\nWarnings in receiver logs ({len(warned)} run(s)):")
    for r in warned:
        print(f"  {r.dataset} / {r.associations} assoc / {r.receiver} / repeat {r.repeat}: "
              f"{len(r.warnings)} warning(s), first: {r.warnings[0]}")


def print_failures(runs: Sequence[Run]) -> None:
    bad = [r for r in runs if not r.ok]
    if not bad:
        return
    bar = "!" * 78
    print(f"\n{bar}\n!! {len(bad)} RUN(S) FAILED OR LOST DATA: their timings mean nothing\n{bar}")
    for r in bad:
        print(f"  {r.dataset} / {r.associations} assoc / {r.receiver} / repeat {r.repeat}: "
              f"stored {r.stored}/{r.instances}, indexed {r.indexed}, "
              f"storescu failures {r.storescu_failures}")
        for p in r.problems[:8]:
            print(f"      {p}")


# -- the benchmark --------------------------------------------------------------------


def plan(quick: bool, audit_compare: bool = False,
         smoke: bool = False) -> list[tuple[int, list[ReceiverSpec]]]:
    """(associations, receivers) per case."""
    one = [ReceiverSpec("dicomnode", 1), ReceiverSpec("storescp"), ReceiverSpec("orthanc")]
    if smoke:  # every receiver kind once, the multi-process node and the 4-association split
        return [(1, one), (4, [ReceiverSpec("dicomnode", 4), ReceiverSpec("storescp", fork=True)])]
    if audit_compare:  # the audit's cost on ingest: same node, trail off
        one.append(ReceiverSpec("dicomnode", 1, audit=False))
    four = [ReceiverSpec("dicomnode", 4), ReceiverSpec("storescp", fork=True),
            ReceiverSpec("orthanc")]
    if not quick:
        four += [ReceiverSpec("dicomnode", 1), ReceiverSpec("dicomnode", 2)]
    return [(1, one), (4, four)]


def run_case(data: Dataset, associations: int, specs: Sequence[ReceiverSpec], repeats: int,
             scratch: Path, runs: list[Run]) -> None:
    for rep in range(1, repeats + 1):
        for spec in specs:  # interleaved: a, b, c, a, b, c, ...
            r = measure(spec, data, associations, rep, scratch)
            runs.append(r)
            status = "ok" if r.ok else "FAILED: " + "; ".join(r.problems[:2])
            if r.warnings:
                status += f" ({len(r.warnings)} warnings in its log)"
            print(f"  [{data.name} x{associations} #{rep}] {r.receiver:<16} {r.seconds:7.2f} s "
                  f"{r.instances_per_s:7.1f} inst/s  RSS {r.peak_rss_mb:5.0f} MB  {status}",
                  flush=True)


def make_synthetic(folder: Path, n: int, size: int = 512) -> Dataset:
    from dicomnode.synthetic import make_ct_series

    t = time.perf_counter()
    files = make_ct_series(folder, n_slices=n, rows=size, cols=size)
    name = "synthetic-ct" if n == 300 else f"synthetic-ct-{n}"
    data = Dataset(name if size == 512 else f"{name}-{size}px", files)
    print(f"generated {n} synthetic CT instances ({data.bytes / MB:.0f} MB) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    return data


def machine_info(scratch: Path) -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "dicomnode"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev, dirty = "?", ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "dicomnode_commit": rev + ("+dirty" if dirty else ""),
        "storescu": tool_version(["storescu", "--version"]),
        "orthanc": tool_version(["Orthanc", "--version"]),
        "scratch": str(scratch),
        "scratch_fs": filesystem_of(scratch),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, no dicomnode p=1/p=2 comparison at 4 associations")
    p.add_argument("--repeats", type=int, help="measurements per receiver and case "
                   "(default 3, 1 with --quick)")
    p.add_argument("--synthetic-instances", type=int, default=300,
                   help="instances in the synthetic CT series (default 300)")
    p.add_argument("--large", action="store_true",
                   help="also send a ~2 GB study to dicomnode alone and report its peak RSS")
    p.add_argument("--large-instances", type=int, default=4000,
                   help="instances in the --large study (0.5 MB each; default 4000)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--tmp", type=Path, default=None,
                   help="scratch folder (must be a real disk for fsync to mean anything; "
                   "default: the system temp folder)")
    p.add_argument("--audit-compare", action="store_true",
                   help="also run dicomnode with its audit trail off (1 association)")
    p.add_argument("--only", choices=("dicomnode", "storescp", "orthanc"), action="append",
                   help="run only these receivers (repeatable)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds, to check the bench still works (tests/test_bench_smoke.py): "
                   f"{SMOKE_INSTANCES} small synthetic instances, 1 repeat, no real data; "
                   "every receiver once at 1 association, dicomnode p=4 and storescp --fork at 4")
    return p.parse_args(argv)


SMOKE_INSTANCES = 8
SMOKE_SIZE = 64  # pixels a side

# Receivers other than dicomnode are baselines: a missing one is skipped, not fatal.
BASELINE_TOOLS = {"storescp": "storescp", "orthanc": "Orthanc"}


def missing_baselines() -> set[str]:
    """Receiver kinds whose program is not installed (each named in a message)."""
    missing = set()
    for kind, tool in BASELINE_TOOLS.items():
        if shutil.which(tool) is None:
            print(f"skipping the {kind} baseline: {tool} is not installed "
                  "(scripts/install-system-deps installs it)")
            missing.add(kind)
    return missing


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so that every receiver is stopped
    for tool in ("storescu", "echoscu"):  # the sender and the readiness probe
        need_tool(tool)
    skipped = missing_baselines()
    if args.smoke:
        args.quick, args.large, args.synthetic_instances = True, False, SMOKE_INSTANCES
    repeats = args.repeats or (1 if args.quick else 3)
    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=args.tmp))
    info = machine_info(scratch)
    print(f"dicomnode ingest benchmark: {info['cpus']} CPUs, scratch {scratch} "
          f"({info['scratch_fs']}), {repeats} repeat(s)", flush=True)
    if info["scratch_fs"].startswith("tmpfs"):
        print("warning: scratch is on tmpfs: fsync costs nothing there; use --tmp on a disk")

    runs: list[Run] = []
    try:
        datasets = [make_synthetic(scratch / "synthetic", args.synthetic_instances,
                                   SMOKE_SIZE if args.smoke else 512)]
        if args.smoke:
            print("smoke mode: the real chest CT is not sent")
        elif TCIA_DIR.is_dir() and dicom_files(TCIA_DIR):
            datasets.append(Dataset("tcia-lung-chest-ct", dicom_files(TCIA_DIR)))
        else:
            print(f"skipping the real chest CT: {TCIA_DIR} is absent")

        for data in datasets:
            warm_page_cache(data.files)
            print(f"\n{data.name}: {len(data.files)} instances, {data.bytes / MB:.0f} MB", flush=True)
            for associations, specs in plan(args.quick, args.audit_compare, args.smoke):
                specs = [s for s in specs if (not args.only or s.kind in args.only)
                         and s.kind not in skipped]
                run_case(data, associations, specs, repeats, scratch, runs)

        if args.large:
            big = make_synthetic(scratch / "large", args.large_instances)
            big.name = f"large-{big.bytes / 1e9:.1f}GB"
            warm_page_cache(big.files)
            print(f"\n{big.name}: {len(big.files)} instances, dicomnode only", flush=True)
            run_case(big, 1, [ReceiverSpec("dicomnode", 1)], 1, scratch, runs)
            run_case(big, 4, [ReceiverSpec("dicomnode", 4)], 1, scratch, runs)
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what was measured", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summaries = summarize(runs)
    targets = evaluate(summaries)
    print()
    print_table(summaries)
    if args.smoke:
        print("\nsmoke mode: a few tiny instances; the figures only show that the bench works")
    print_targets(targets)
    print_warnings(runs)
    print_failures(runs)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": info,
        "settings": {"repeats": repeats, "quick": args.quick, "large": args.large,
                     "smoke": args.smoke, "skipped_baselines": sorted(skipped),
                     "mb": "1e6 bytes", "rss_interval_s": RSS_INTERVAL_S},
        "summary": [asdict(s) for s in summaries],
        "targets": [asdict(t) for t in targets],
        "runs": [asdict(r) | {"instances_per_s": r.instances_per_s, "mb_per_s": r.mb_per_s}
                 for r in runs],
    }, indent=2) + "\n")
    print(f"\nresults: {args.out}")
    return 1 if any(not r.ok for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
