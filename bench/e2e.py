#!/usr/bin/env python3
"""End-to-end benchmark: from the last instance acknowledged to SEG and SR stored in
the PACS, and how much of that is the node's own overhead.

    .venv/bin/python bench/e2e.py [--quick] [--smoke] [--out bench/results/e2e.json]

Orthanc plays the PACS. A dicomnode whose config routes chest CT to the
``lung_density`` model, with Orthanc as its only destination (objects SEG and SR),
is started fresh for every run and is ready (models preloaded, C-ECHO answered)
before the clock starts. DCMTK ``storescu`` sends the series to the node over one
association; t0 is when storescu exits (its last C-STORE was acknowledged), and the
node's own record of it is the study's ``last_received`` in ``dicomnode status
--json``. The bench then polls Orthanc's REST API every ``--poll`` seconds until
the SEG and the SR are stored there: t1. Overhead = (t1 - t0) - quiet window -
the model's own predict time; the node's log, its job result (``seconds``,
``model_seconds``), its index and its outbox break it down.

``--smoke`` (tests/test_bench_smoke.py): one run of a 24-slice synthetic CT with a
0.5 s quiet window, no real data: the whole path, in seconds, to check the bench works.

This is a benchmark, not a test: it prints a table, writes JSON and marks the
target PASS or MISS, but never fails on a timing. The exit status is 1 only when a
run did not deliver SEG and SR, or the node or Orthanc logged errors (see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ib  # noqa: E402  (bench/ingest.py: receivers, processes, helpers)

ROOT = ib.ROOT
TCIA_DIR = ib.TCIA_DIR
DEFAULT_OUT = ROOT / "bench" / "results" / "e2e.json"

OVERHEAD_TARGET_S = 1.5  # for the 300-slice synthetic CT (issue 11)
PEER_OVERHEAD_S = 45.0  # what a peer spends per task, for comparison
SEND_TIMEOUT_S = 300.0
DELIVERY_TIMEOUT_S = 300.0

# "2024-05-01 12:00:00,123 INFO dicomnode.worker.inference: job 1 started: ..."
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


# -- the node and the PACS ------------------------------------------------------------


class PipelineNode(ib.DicomNode):
    """dicomnode with the whole pipeline: chest CT -> lung_density -> SEG + SR -> PACS."""

    def __init__(self, workdir: Path, pacs: ib.Orthanc, quiet_seconds: float,
                 tree: Path | None = None) -> None:
        super().__init__(workdir, processes=1)
        self.pacs = pacs
        self.quiet_seconds = quiet_seconds
        self.tree = tree  # another dicomnode source tree (--baseline), else this one

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.tree is not None:  # its dicomnode first on the path (and its models)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.tree), env.get("PYTHONPATH"))
                                                if p)
        return env

    @property
    def label(self) -> str:
        return "dicomnode"

    def command(self) -> list[str]:
        config = {
            "ae_title": self.ae_title,
            "bind_address": "127.0.0.1",
            "port": self.port,
            "storage": str(self.storage),
            "log_level": "INFO",
            "http": {"port": 0},
            "models_dir": str((self.tree or ROOT) / "models"),
            "completion": {"quiet_seconds": self.quiet_seconds},
            "inference": {"preload": True},
            "destinations": [{
                "name": "pacs", "ae_title": self.pacs.ae_title, "host": "127.0.0.1",
                "port": self.pacs.port, "objects": ["seg", "sr"],
            }],
            "export": {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0},
            "routing": [{
                "name": "chest-ct-lung-density",
                "model": "lung_density",
                "destinations": ["pacs"],
                "match": {"modality": ["CT"], "body_part": "chest|lung|thorax",
                          "orientation": "axial"},
            }],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)]

    def wait_ready(self, timeout: float = ib.READY_TIMEOUT_S) -> None:
        # The SCP starts after the models are preloaded, so a C-ECHO answer means warm.
        super().wait_ready(timeout)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if " ready on " in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise ib.ReceiverError(f"dicomnode never logged 'ready on':\n{ib.tail(self.log_path)}")

    def cli_json(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "dicomnode", *args, "--json", "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=60, env=self.env,
        )
        if out.returncode != 0:
            raise ib.ReceiverError(f"dicomnode {' '.join(args)} failed: {out.stderr.strip()}")
        return dict(json.loads(out.stdout))

    def log_events(self) -> list[tuple[float, str, str]]:
        """(unix time, level, message) of every log line (local time, ms precision)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((t, m.group(2), m.group(4)))
        return events


def rest(pacs: ib.Orthanc, path: str, body: Any = None, timeout: float = 10) -> Any:
    url = f"http://127.0.0.1:{pacs.http_port}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def reception_date(value: str) -> float | None:
    """Orthanc's ReceptionDate metadata ('20240501T120000' or ISO) as unix time."""
    for fmt in ("%Y%m%dT%H%M%S", "%Y%m%dT%H%M%S.%f", "%Y-%m-%dT%H:%M:%S.%f",
                "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(value.strip(), fmt).timestamp()
        except ValueError:
            continue
    return None


# -- one run ---------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    files: list[Path]
    bytes: int = 0
    study_uid: str = ""
    series_uids: frozenset[str] = frozenset()  # the series sent (the node adds its results')

    def __post_init__(self) -> None:
        import pydicom

        self.bytes = sum(p.stat().st_size for p in self.files)
        headers = [pydicom.dcmread(p, stop_before_pixels=True,
                                   specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
                   for p in self.files]
        self.study_uid = str(headers[0].StudyInstanceUID)
        self.series_uids = frozenset(str(h.SeriesInstanceUID) for h in headers)


@dataclass
class Run:
    dataset: str
    repeat: int
    instances: int  # sent, and expected in the node's index as received
    quiet_seconds: float
    variant: str = "this tree"  # or "baseline" (--baseline: another source tree)
    warm_up: bool = False  # the node ran one untimed job first
    ok: bool = False
    send_s: float = float("nan")  # storescu start -> exit
    total_s: float = float("nan")  # t1 - t0 (storescu exit)
    total_index_s: float = float("nan")  # t1 - last_received (the node's own t0)
    model_s: float = float("nan")  # result model_seconds: the model's predict
    job_s: float = float("nan")  # result seconds: load + predict
    overhead_s: float = float("nan")  # total - quiet - model
    node_cpu_s: float = float("nan")  # CPU the node (+ its dciodvfy) used from t0 to t1
    t0_index_lag_s: float = float("nan")  # storescu exit - last_received
    poll_s: float = 0.0
    # timeline from last_received (seconds); None where a mark is missing
    marks: dict[str, float | None] = field(default_factory=dict)
    # segments (seconds) between consecutive marks, plus the inner split of the job
    segments: dict[str, float] = field(default_factory=dict)
    received_indexed: int = 0  # instances of the sent series in the node's index
    results_indexed: dict[str, int] = field(default_factory=dict)  # node's own series: SOP class -> n
    seg_uid: str = ""
    sr_uid: str = ""
    orthanc_reception: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# Segments, in order: (name, from mark, to mark)
SEGMENTS: tuple[tuple[str, str, str], ...] = (
    ("completion (quiet + lag)", "last_received", "completed"),
    ("routing -> job", "completed", "job_created"),
    ("job pickup", "job_created", "job_started"),
    ("load volume + predict", "job_started", "inferred"),
    # the SEG and the SR are each written and checked in a thread of their own (the SR is
    # encoded while the SEG's read-back and dciodvfy run), and the prediction is stored
    # meanwhile: one segment up to the later of the two, and each one's own end
    ("encode + check SEG and SR", "inferred", "encoded"),
    ("  of which: SEG encoded+checked", "inferred", "encoded_seg"),
    ("  of which: SR encoded+checked", "inferred", "encoded_sr"),
    ("queue in outbox", "encoded", "queued"),
    ("dispatch + C-STORE to PACS", "queued", "sent"),
    ("outbox sent_at -> seen in PACS (poll)", "sent", "t1"),
)


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of process ``pid`` and its waited-for children (the
    node's dciodvfy runs), from /proc; None where that cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def first(events: Sequence[tuple[float, str, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    for t, _level, msg in events:
        if rx.search(msg):
            return t
    return None


def wait_for_results(pacs: ib.Orthanc, node: PipelineNode, expected: int, poll: float,
                     timeout: float) -> float:
    """Poll Orthanc until it holds ``expected`` instances (SEG + SR); returns t1 (unix)."""
    deadline = time.monotonic() + timeout
    next_log_check = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_log_check:  # a failed job would only be retried: stop
            next_log_check = time.monotonic() + 1.0
            errors = node._log_lines(("ERROR", "CRITICAL", "Traceback"))
            if errors:
                raise ib.ReceiverError(f"dicomnode logged an error: {errors[0]}\n"
                                       f"{ib.tail(node.log_path)}")
        try:
            stats = rest(pacs, "/statistics", timeout=5)
            if int(stats["CountInstances"]) >= expected:
                return time.time()
        except (OSError, ValueError, KeyError):
            pass
        if node.proc is not None and node.proc.poll() is not None:
            raise ib.ReceiverError(f"dicomnode exited with {node.proc.returncode}:\n"
                                   f"{ib.tail(node.log_path)}")
        time.sleep(poll)
    raise ib.ReceiverError(f"SEG and SR not in Orthanc within {timeout:.0f} s:\n"
                           f"{ib.tail(node.log_path)}")


def send(node: PipelineNode, data: Dataset, workdir: Path) -> tuple[float, float]:
    """One storescu, one association. Returns (start, exit) as unix times."""
    log = workdir / "storescu.log"
    cmd = ["storescu", "-nh", "-aet", "BENCHSCU", "-aec", node.ae_title, "127.0.0.1",
           str(node.port), *map(str, data.files)]
    start = time.time()
    proc = ib.spawn(cmd, log, env=ib.PEER_ENV)
    try:
        code = proc.wait(SEND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ib.stop_group(proc, timeout=5)
        raise ib.ReceiverError(f"storescu still running after {SEND_TIMEOUT_S:.0f} s") from None
    end = time.time()
    bad = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(("E:", "F:"))]
    if code != 0 or bad:
        raise ib.ReceiverError(f"storescu exited with {code}: {'; '.join(bad[:3])}")
    return start, end


def settle(node: PipelineNode, jobs_done: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """status and outbox once ``jobs_done`` jobs are done and their deliveries recorded
    (or after 30 s): the PACS may hold an object before the node has recorded it sent."""
    deadline = time.monotonic() + 30
    while True:
        status = node.cli_json("status")
        outbox = node.cli_json("outbox", "--all")
        done = [j for j in status["jobs"] if j["state"] == "done"]
        sent = [d for d in outbox["deliveries"] if d["state"] == "sent"]
        if (len(done) >= jobs_done and len(sent) >= 2 * jobs_done) or time.monotonic() > deadline:
            return status, outbox
        time.sleep(0.2)


def measure(data: Dataset, repeat: int, quiet: float, poll: float, scratch: Path,
            warm_up: Dataset | None = None, tree: Path | None = None) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="e2e-", dir=scratch))
    run = Run(data.name, repeat, len(data.files), quiet, "baseline" if tree else "this tree",
              warm_up is not None, poll_s=poll)
    pacs = ib.Orthanc(workdir / "orthanc")
    node = PipelineNode(workdir / "node", pacs, quiet, tree)
    try:
        with ib.running(pacs), ib.running(node):
            before = 0
            if warm_up is not None:  # one untimed job: first-call costs are paid by it
                send(node, warm_up, workdir)
                wait_for_results(pacs, node, 2, poll, DELIVERY_TIMEOUT_S)
                settle(node, 1)
                before = 2
            t_start, t0 = send(node, data, workdir)
            cpu0 = process_cpu(node.proc.pid if node.proc else None)
            t1 = wait_for_results(pacs, node, before + 2, poll, DELIVERY_TIMEOUT_S)
            cpu1 = process_cpu(node.proc.pid if node.proc else None)
            if cpu0 is not None and cpu1 is not None:
                run.node_cpu_s = cpu1 - cpu0
            run.send_s = t0 - t_start
            run.total_s = t1 - t0
            status, outbox = settle(node, before // 2 + 1)
            analyse(run, node, pacs, data, status, outbox, t0, t1)
    except ib.ReceiverError as exc:
        run.problems.append(str(exc))
    finally:
        run.problems.extend(node.problems())
        run.problems.extend(f"orthanc: {p}" for p in pacs.problems())
        run.warnings.extend(node.warnings())
        shutil.rmtree(workdir, ignore_errors=True)
    run.ok = not run.problems
    return run


SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (PS3.4 B.5)
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.",)  # the SR storage classes (PS3.4 B.5)


def count_indexed(study: dict[str, Any], sent_series: frozenset[str]) -> tuple[int, dict[str, int]]:
    """(received instances of the sent series, {SOP class: n} of the node's own results).

    The node indexes its results (origin 'result') in the same study, so the study's
    ``instances`` total in ``dicomnode status --json`` counts them too: a 64-slice CT
    with its SEG and SR is 66 there. The sent series are told apart by their UIDs."""
    received, results = 0, dict[str, int]()
    for series in study["series"]:
        if series["series_uid"] in sent_series:
            received += int(series["instances"])
        else:
            for cls in series["sop_classes"]:
                results[cls] = results.get(cls, 0) + int(series["instances"])
    return received, results


def analyse(run: Run, node: PipelineNode, pacs: ib.Orthanc, data: Dataset,
            status: dict[str, Any], outbox: dict[str, Any], t0: float, t1: float) -> None:
    study_uid = data.study_uid
    studies = [s for s in status["studies"] if s["study_uid"] == study_uid]
    jobs = [j for j in status["jobs"] if j["study_uid"] == study_uid]
    if len(studies) != 1:
        run.problems.append(f"node index holds {len(studies)} studies {study_uid}, expected 1")
        return
    run.received_indexed, run.results_indexed = count_indexed(studies[0], data.series_uids)
    if run.received_indexed != run.instances:
        run.problems.append(f"node index holds {run.received_indexed} received instances of the "
                            f"sent series, expected {run.instances}")
        return
    n_seg = run.results_indexed.get(SEG_CLASS, 0)
    n_sr = sum(n for cls, n in run.results_indexed.items() if cls.startswith(SR_CLASSES))
    if (n_seg, n_sr) != (1, 1) or sum(run.results_indexed.values()) != 2:
        run.problems.append(f"node index holds results {run.results_indexed}, expected one SEG "
                            "and one SR")
    if len(jobs) != 1 or jobs[0]["state"] != "done" or not jobs[0]["result"]:
        run.problems.append(f"expected one done job, got {[(j['id'], j['state']) for j in jobs]}")
        return
    job, study = jobs[0], studies[0]
    result = job["result"]
    last = float(study["last_received"])
    run.model_s = float(result["model_seconds"])
    run.job_s = float(result["seconds"])
    run.total_index_s = t1 - last
    run.t0_index_lag_s = t0 - last
    run.overhead_s = run.total_s - run.quiet_seconds - run.model_s

    # Orthanc holds exactly the SEG and the SR that the outbox says were sent
    sent = [d for d in outbox["deliveries"] if d["state"] == "sent" and d["key"] == job["key"]]
    if len(sent) != 2:
        run.problems.append(f"outbox: {len(sent)} deliveries sent, expected 2 (SEG, SR)")
    for d in sent:
        found = rest(pacs, "/tools/find", {"Level": "Instance",
                                           "Query": {"SOPInstanceUID": d["sop_instance_uid"]}})
        if len(found) != 1:
            run.problems.append(f"Orthanc does not hold {d['sop_instance_uid']}")
            continue
        oid = found[0]
        modality = rest(pacs, f"/instances/{oid}/simplified-tags").get("Modality", "?")
        if modality == "SEG":
            run.seg_uid = d["sop_instance_uid"]
        elif modality == "SR":
            run.sr_uid = d["sop_instance_uid"]
        try:
            run.orthanc_reception[modality] = str(rest(pacs, f"/instances/{oid}/metadata/ReceptionDate"))
        except OSError:
            pass
    if not (run.seg_uid and run.sr_uid):
        run.problems.append("Orthanc does not hold both a SEG and an SR from the node")

    events = node.log_events()
    jid = job["id"]
    started = first(events, rf"^job {jid} started")
    sent_at = [float(d["sent_at"]) for d in sent if d.get("sent_at")]
    marks: dict[str, float | None] = {
        "last_received": last,
        "t0_storescu_exit": t0,
        "completed": float(study["completed_at"]) if study.get("completed_at") else None,
        "job_created": first(events, rf"\(job {jid}, "),  # the routing sink's line
        "job_started": started,
        "inferred": started + run.job_s if started is not None else None,
        "encoded_seg": first(events, rf"^encoded \d+ SEG object\(s\) for study {re.escape(study_uid)}"),
        "encoded_sr": first(events, rf"^encoded \d+ SR object\(s\) for study {re.escape(study_uid)}"),
        "encoded": None,
        "queued": first(events, rf"^job {jid}: \d+ object\(s\) queued for pacs"),
        "sent": max(sent_at) if sent_at else None,
        "t1": t1,
    }
    if marks["encoded_seg"] is not None and marks["encoded_sr"] is not None:
        marks["encoded"] = max(marks["encoded_seg"], marks["encoded_sr"])
    run.marks = {k: (None if v is None else round(v - last, 4)) for k, v in marks.items()}
    for name, a, b in SEGMENTS:
        ta, tb = marks.get(a), marks.get(b)
        if ta is not None and tb is not None:
            run.segments[name] = tb - ta
    run.segments["  of which: load volume"] = run.job_s - run.model_s
    run.segments["  of which: model predict"] = run.model_s
    if marks["completed"] is not None:
        run.segments["  completion lag beyond quiet"] = marks["completed"] - last - run.quiet_seconds


# -- reporting ------------------------------------------------------------------------


@dataclass
class Summary:
    dataset: str
    instances: int
    runs: int
    failed_runs: int
    quiet_s: float
    send_s: float
    total_s: float
    total_index_s: float
    model_s: float
    load_s: float
    overhead_s: float
    segments: dict[str, float]
    variant: str = "this tree"
    node_cpu_s: float = float("nan")


def label(r: Run) -> str:
    """The data set's name, marked when the run is of the --baseline tree."""
    return r.dataset if r.variant == "this tree" else f"{r.dataset}@{r.variant}"


def med(values: Sequence[float]) -> float:
    good = [v for v in values if v == v]
    return statistics.median(good) if good else float("nan")


def summarize(runs: Sequence[Run]) -> list[Summary]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    out = []
    for name, rs in groups.items():
        good = [r for r in rs if r.ok] or rs
        seg_names = list(dict.fromkeys(k for r in good for k in r.segments))
        out.append(Summary(
            name, rs[0].instances, len(rs), sum(not r.ok for r in rs), rs[0].quiet_seconds,
            med([r.send_s for r in good]), med([r.total_s for r in good]),
            med([r.total_index_s for r in good]), med([r.model_s for r in good]),
            med([r.job_s - r.model_s for r in good]), med([r.overhead_s for r in good]),
            {k: med([r.segments[k] for r in good if k in r.segments]) for k in seg_names},
            rs[0].variant, med([r.node_cpu_s for r in good]),
        ))
    return out


def print_runs(runs: Sequence[Run]) -> None:
    print(f"\n{'dataset':<24} {'#':>2} {'send s':>7} {'total s':>8} {'from idx':>8} "
          f"{'quiet':>6} {'model s':>8} {'load s':>7} {'overhead':>9}  status")
    for r in runs:
        status = "ok" if r.ok else "FAILED: " + "; ".join(p.splitlines()[0] for p in r.problems[:2])
        print(f"{label(r):<24} {r.repeat:>2} {r.send_s:>7.2f} {r.total_s:>8.2f} "
              f"{r.total_index_s:>8.2f} {r.quiet_seconds:>6.1f} {r.model_s:>8.2f} "
              f"{r.job_s - r.model_s:>7.2f} {r.overhead_s:>9.2f}  {status}")


def print_table(summaries: Sequence[Summary], warm_up: bool = False) -> None:
    mode = ("after one untimed warm-up job" if warm_up
            else "the first job of a fresh node (models preloaded)")
    print(f"\nMedians (seconds), {mode}. total = t1 (SEG+SR stored in Orthanc) - t0 "
          "(storescu exit);\noverhead = total - quiet window - model predict; node CPU = "
          "CPU time of the node process (threads, dciodvfy) from t0 to t1, model included")
    head = (f"{'dataset':<24} {'inst':>5} {'runs':>4} {'send':>6} {'total':>7} {'quiet':>6} "
            f"{'model':>7} {'load':>6} {'overhead':>9} {'node CPU':>9}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        flag = f"  <-- {s.failed_runs} FAILED" if s.failed_runs else ""
        print(f"{s.dataset:<24} {s.instances:>5} {s.runs:>4} {s.send_s:>6.2f} {s.total_s:>7.2f} "
              f"{s.quiet_s:>6.1f} {s.model_s:>7.2f} {s.load_s:>6.2f} {s.overhead_s:>9.2f} "
              f"{s.node_cpu_s:>9.2f}{flag}")
    print("\nWhere the time goes after the last instance (medians, seconds; from the node's "
          "log (ms), index and outbox):")
    names = list(dict.fromkeys(k for s in summaries for k in s.segments))
    w = max([22, *(len(s.dataset) + 2 for s in summaries)])
    print(f"  {'segment':<42}" + "".join(f"{s.dataset:>{w}}" for s in summaries))
    for n in names:
        print(f"  {n:<42}" + "".join(
            f"{s.segments.get(n, float('nan')):>{w}.3f}" for s in summaries))


@dataclass
class Target:
    dataset: str
    what: str
    value: float
    goal: str
    passed: bool
    note: str = ""


def evaluate(summaries: Sequence[Summary]) -> list[Target]:
    out = []
    for s in summaries:
        if s.variant == "this tree" and s.dataset.startswith("synthetic-ct") and s.instances >= 300:
            out.append(Target(s.dataset, "node overhead (total - quiet - model)",
                              round(s.overhead_s, 2), f"<= {OVERHEAD_TARGET_S:g} s",
                              s.overhead_s <= OVERHEAD_TARGET_S and not s.failed_runs,
                              "failed runs" if s.failed_runs else
                              f"a peer spends ~{PEER_OVERHEAD_S:g} s per task"))
    return out


def print_targets(targets: Sequence[Target]) -> None:
    if targets:
        print("\nTarget:")
    for t in targets:
        print(f"  {'PASS' if t.passed else 'MISS'}  {t.dataset:<20} {t.what}: {t.value:.2f} s "
              f"(target {t.goal})  [{t.note}]")


def print_failures(runs: Sequence[Run]) -> None:
    bad = [r for r in runs if not r.ok]
    if not bad:
        return
    bar = "!" * 78
    print(f"\n{bar}\n!! {len(bad)} RUN(S) FAILED: their timings mean nothing\n{bar}")
    for r in bad:
        print(f"  {label(r)} / repeat {r.repeat}:")
        for p in r.problems[:6]:
            print("      " + p.replace("\n", "\n      "))


# -- the benchmark --------------------------------------------------------------------


def datasets(scratch: Path, synthetic_slices: int, real: bool = True) -> list[Dataset]:
    from dicomnode.synthetic import make_ct_series

    out = []
    if not real:
        print("smoke mode: the real chest CT is not sent")
    elif TCIA_DIR.is_dir() and ib.dicom_files(TCIA_DIR):
        out.append(Dataset("tcia-lung-chest-ct", ib.dicom_files(TCIA_DIR)))
    else:
        print(f"skipping the real chest CT: {TCIA_DIR} is absent")
    t = time.perf_counter()
    files = make_ct_series(scratch / "synthetic", n_slices=synthetic_slices)
    name = "synthetic-ct" if synthetic_slices == 300 else f"synthetic-ct-{synthetic_slices}"
    out.append(Dataset(name, files))
    print(f"generated {synthetic_slices} synthetic CT slices ({out[-1].bytes / ib.MB:.0f} MB) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    p.add_argument("--repeats", type=int, help="runs per data set (default 3, 1 with --quick)")
    p.add_argument("--quiet-seconds", type=float, default=2.0,
                   help="the node's completion quiet window (default 2.0)")
    p.add_argument("--poll", type=float, default=0.025,
                   help="Orthanc polling interval in seconds (default 0.025)")
    p.add_argument("--synthetic-slices", type=int, default=300,
                   help="slices of the synthetic CT (default 300)")
    p.add_argument("--warm-up", action="store_true",
                   help="before the timed study, let each fresh node run one untimed job "
                   "(a 24-slice synthetic chest CT), so that first-call costs are not timed")
    p.add_argument("--only", choices=("chest", "synthetic"), action="append",
                   help="run only this data set (repeatable)")
    p.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                   help="also run the dicomnode of another source tree (e.g. `git worktree add "
                   "/tmp/base main`), interleaved with this one, for a before/after in one run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system temp)")
    p.add_argument("--smoke", action="store_true",
                   help=f"one run of a {SMOKE_SLICES}-slice synthetic CT, quiet window "
                   f"{SMOKE_QUIET_S:g} s, no real data (checks the bench works)")
    return p.parse_args(argv)


SMOKE_SLICES = 24  # lung_density needs at least 20
SMOKE_QUIET_S = 0.5


def _interrupt(signum: int, _frame: object) -> None:
    # once only: a second signal must not cut short the clean-up the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so that every process is stopped
    for tool in ("storescu", "echoscu", "Orthanc"):  # the sender, the probe and the PACS
        ib.need_tool(tool)
    if args.smoke:
        args.quick, args.warm_up, args.only = True, False, None
        args.synthetic_slices, args.quiet_seconds = SMOKE_SLICES, SMOKE_QUIET_S
    repeats = args.repeats or (1 if args.quick else 3)
    trees: list[Path | None] = [None]
    if args.baseline is not None:
        if not (args.baseline / "dicomnode" / "__init__.py").is_file():
            print(f"--baseline {args.baseline}: not a dicomnode source tree", file=sys.stderr)
            return 2
        trees.append(args.baseline.resolve())
        print(f"baseline: the dicomnode of {args.baseline} runs too, interleaved")
    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-e2e-", dir=args.tmp))
    info = ib.machine_info(scratch)
    info["load_average"] = os.getloadavg()
    print(f"dicomnode end-to-end benchmark: {info['cpus']} CPUs, load {info['load_average'][0]:.1f}, "
          f"scratch {scratch} ({info['scratch_fs']}), {repeats} repeat(s), "
          f"quiet window {args.quiet_seconds:g} s, poll {args.poll * 1000:.0f} ms", flush=True)

    runs: list[Run] = []
    try:
        data = datasets(scratch, args.synthetic_slices, real=not args.smoke)
        if args.only:
            data = [d for d in data if any(d.name.startswith(
                "tcia" if o == "chest" else "synthetic") for o in args.only)]
        warm = None
        if args.warm_up:
            from dicomnode.synthetic import make_ct_series

            warm = Dataset("warm-up", make_ct_series(scratch / "warm-up", n_slices=24, seed=1))
            print("warm-up: each node first runs one untimed job (24-slice synthetic CT)")
        for d in data + ([warm] if warm else []):
            ib.warm_page_cache(d.files)
        for rep in range(1, repeats + 1):
            for d, tree in [(d, t) for d in data for t in trees]:  # interleaved
                r = measure(d, rep, args.quiet_seconds, args.poll, scratch, warm, tree)
                runs.append(r)
                status = "ok" if r.ok else "FAILED: " + r.problems[0].splitlines()[0]
                print(f"  [{label(r)} #{rep}] total {r.total_s:6.2f} s  model {r.model_s:5.2f} s  "
                      f"load {r.job_s - r.model_s:5.2f} s  overhead {r.overhead_s:5.2f} s  "
                      f"indexed {r.received_indexed} received + "
                      f"{sum(r.results_indexed.values())} results  {status}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what was measured", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summaries = summarize(runs)
    targets = evaluate(summaries)
    print_runs(runs)
    print_table(summaries, args.warm_up)
    print_targets(targets)
    print_failures(runs)
    stamps = {k: v for r in runs for k, v in r.orthanc_reception.items()}
    if stamps:
        print(f"\nOrthanc ReceptionDate, e.g. {stamps}: "
              f"{'sub-second' if any('.' in v for v in stamps.values()) else 'whole seconds only'}"
              ", so t1 comes from polling (and the node's outbox sent_at)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": info,
        "settings": {"repeats": repeats, "quick": args.quick, "smoke": args.smoke,
                     "baseline": str(args.baseline) if args.baseline else None,
                     "warm_up": args.warm_up, "quiet_seconds": args.quiet_seconds,
                     "poll_s": args.poll, "synthetic_slices": args.synthetic_slices,
                     "overhead_target_s": OVERHEAD_TARGET_S},
        "summary": [asdict(s) for s in summaries],
        "targets": [asdict(t) for t in targets],
        "runs": [asdict(r) for r in runs],
    }, indent=2) + "\n")
    print(f"\nresults: {args.out}")
    return 1 if any(not r.ok for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
