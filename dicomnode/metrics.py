"""Prometheus metrics and health checks for IT (``/metrics``, ``/healthz``, ``/readyz``).

Two kinds of figures:

* **Events the serving process sees** (counters and histograms updated by the
  stages through :class:`Metrics`' methods): associations and rejections,
  instances received, studies completed, jobs finished, job duration and
  turnaround. They count what *this* process observes: with several receiving
  processes, the counts of the others are not in this process' registry.
* **State read at scrape time** (gauges computed by a custom collector from
  callables or from the shared SQLite stores): the job queue by state and the
  age of its oldest pending job, exports per destination and state, and the
  index's instances by transfer syntax and calling AE, studies by state and
  completions. The index is shared by every process, so
  ``dicomnode_index_instances`` is the cross-process truth for "instances
  received"; prefer it in dashboards when ingest runs in several processes.

Label values that come from the network (calling AE titles, rejection reasons)
are capped at :data:`MAX_LABEL_VALUES` distinct values per metric; the rest are
counted under ``"other"``, so a hostile sender cannot blow up the registry.

Health: :func:`health` runs named checks (each ``() -> (ok, detail)``), never
raises, and :func:`health_response` turns the result into an HTTP status and
JSON body. ``/healthz`` is liveness (no checks: the process answered);
``/readyz`` runs :func:`readiness_checks` (storage writable, databases answer,
scheduler running, audit trail writable, disk above the guard). Their details name
folders, files and causes, never a patient or a caller.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomnode.core.reports import IndexStats

PREFIX = "dicomnode"
MAX_LABEL_VALUES = 200
OTHER = "other"

JOB_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
TURNAROUND_BUCKETS = (5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200)

Check = Callable[[], tuple[bool, str]]


def _label(value: Any) -> str:
    """An enum member or anything else as a label value."""
    value = getattr(value, "value", value)
    return "" if value is None else str(value)


class _Capped:
    """Remembers up to ``limit`` distinct label values; later ones become ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def __call__(self, value: Any) -> str:
        text = _label(value).strip()[:64]
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) < self._limit:
                self._seen.add(text)
                return text
        return OTHER


class _StateCollector(Collector):
    """Gauges computed at scrape time from callables, so they are always current.

    A source that raises (database locked, closed store) is reported by
    ``dicomnode_metrics_source_up{source} 0`` and its gauges are left out; the
    scrape itself never fails.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queue_counts: Callable[[], Mapping[Any, int]] | None = None
        self.oldest_pending_age: Callable[[], float | None] | None = None
        self.exports: Callable[[], Mapping[str, Mapping[Any, int]]] | None = None
        self.index_stats: Callable[[], IndexStats] | None = None
        # issue 12: remote workers (queue.backend celery)
        self.jobs_by_model: Callable[[], Mapping[str, Mapping[Any, int]]] | None = None
        self.broker: Callable[[], Mapping[str, Any]] | None = None
        self.workers: Callable[[], Iterable[Any]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the queue by state", labels=["state"]),
            GaugeMetricFamily(f"{PREFIX}_oldest_pending_job_age_seconds",
                              "Age of the oldest pending job (0 when none)"),
            GaugeMetricFamily(f"{PREFIX}_exports", "Export deliveries by destination and state",
                              labels=["destination", "state"]),
            GaugeMetricFamily(f"{PREFIX}_index_instances",
                              "Instances held in the shared index",
                              labels=["transfer_syntax", "calling_ae"]),
            GaugeMetricFamily(f"{PREFIX}_index_studies", "Studies in the index by state",
                              labels=["state"]),
            GaugeMetricFamily(f"{PREFIX}_index_completions",
                              "Study completions (revisions) recorded in the index"),
            GaugeMetricFamily(f"{PREFIX}_metrics_source_up",
                              "Whether a scrape-time source answered", labels=["source"]),
            *_worker_families().values(),
        ]

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_metrics_source_up",
                               "Whether a scrape-time source answered", labels=["source"])
        out: list[Metric] = []
        for name, fn in (("queue", self._queue), ("exports", self._exports),
                         ("index", self._index), ("jobs_by_model", self._by_model),
                         ("broker", self._broker), ("workers", self._workers)):
            try:
                families = fn()
            except Exception:
                up.add_metric([name], 0)
                continue
            if families is not None:
                up.add_metric([name], 1)
                out.extend(families)
        out.append(up)
        return out

    def _queue(self) -> list[Metric] | None:
        if self.queue_counts is None and self.oldest_pending_age is None:
            return None
        out: list[Metric] = []
        if self.queue_counts is not None:
            jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the queue by state",
                                     labels=["state"])
            for state, n in sorted((_label(k), v) for k, v in self.queue_counts().items()):
                jobs.add_metric([state], float(n))
            out.append(jobs)
        if self.oldest_pending_age is not None:
            age = self.oldest_pending_age()
            out.append(GaugeMetricFamily(f"{PREFIX}_oldest_pending_job_age_seconds",
                                         "Age of the oldest pending job (0 when none)",
                                         value=float(age or 0.0)))
        return out

    def _exports(self) -> list[Metric] | None:
        if self.exports is None:
            return None
        fam = GaugeMetricFamily(f"{PREFIX}_exports", "Export deliveries by destination and state",
                                labels=["destination", "state"])
        for dest, states in sorted(self.exports().items()):
            for state, n in sorted((_label(k), v) for k, v in states.items()):
                fam.add_metric([str(dest), state], float(n))
        return [fam]

    def _index(self) -> list[Metric] | None:
        if self.index_stats is None:
            return None
        stats = self.index_stats()
        inst = GaugeMetricFamily(f"{PREFIX}_index_instances",
                                 "Instances held in the shared index",
                                 labels=["transfer_syntax", "calling_ae"])
        other: dict[str, int] = {}
        for i, (ts, ae, n) in enumerate(stats.instances):
            if i < MAX_LABEL_VALUES:
                inst.add_metric([str(ts), str(ae).strip()], float(n))
            else:  # too many distinct label pairs: fold the smallest into "other"
                other[str(ts)] = other.get(str(ts), 0) + int(n)
        for ts, n in sorted(other.items()):
            inst.add_metric([ts, OTHER], float(n))
        studies = GaugeMetricFamily(f"{PREFIX}_index_studies", "Studies in the index by state",
                                    labels=["state"])
        by_state = {"receiving": 0, "complete": 0}
        by_state.update(stats.studies)
        for state, n in sorted(by_state.items()):
            studies.add_metric([state], float(n))
        comps = GaugeMetricFamily(f"{PREFIX}_index_completions",
                                  "Study completions (revisions) recorded in the index",
                                  value=float(stats.completions))
        return [inst, studies, comps]


    # -- issue 12: per-model queue depth, the broker, remote workers' heartbeats ----------

    def _by_model(self) -> list[Metric] | None:
        if self.jobs_by_model is None:
            return None
        fam = _worker_families()["jobs_by_model"]
        for model, states in sorted(self.jobs_by_model().items()):
            for state, n in sorted((_label(k), v) for k, v in states.items()):
                fam.add_metric([str(model), state], float(n))
        return [fam]

    def _broker(self) -> list[Metric] | None:
        if self.broker is None:
            return None
        report = self.broker()
        f = _worker_families()
        for queue, kinds in sorted((report.get("queues") or {}).items()):
            for kind, n in sorted(kinds.items()):
                f["broker_messages"].add_metric([str(queue), str(kind)], float(n))
        f["broker_handoffs_waiting"].add_metric([], float(report.get("handoffs_waiting", 0)))
        f["broker_up"].add_metric([], 1.0 if report.get("up") else 0.0)
        return [f["broker_messages"], f["broker_handoffs_waiting"], f["broker_up"]]

    def _workers(self) -> list[Metric] | None:
        if self.workers is None:
            return None
        now = time.time()
        f = _worker_families()
        alive = gone = 0
        for i, w in enumerate(self.workers()):
            if w.alive(now):
                alive += 1
            else:
                gone += 1
            if i < MAX_LABEL_VALUES:
                f["worker_heartbeat_age_seconds"].add_metric([w.name], w.age(now))
                f["worker_busy"].add_metric(
                    [w.name], 1.0 if w.alive(now) and w.job_id is not None else 0.0)
                f["worker_jobs_done"].add_metric([w.name], float(w.jobs_done))
        f["workers"].add_metric(["alive"], float(alive))
        f["workers"].add_metric(["gone"], float(gone))
        return [f["workers"], f["worker_heartbeat_age_seconds"], f["worker_busy"],
                f["worker_jobs_done"]]


def _worker_families() -> dict[str, GaugeMetricFamily]:
    """Fresh gauge families of the remote-worker metrics (a collector fills new ones per scrape)."""
    specs = {
        "jobs_by_model": ("Jobs by model and state", ["model", "state"]),
        "broker_messages": ("Messages on the broker per queue (one per model): waiting stat,"
                            " waiting routine, and unacked (held by a worker)", ["queue", "kind"]),
        "broker_handoffs_waiting": ("Runnable jobs not yet handed to the broker (e.g. while it"
                                    " is down)", None),
        "broker_up": ("1 when the node could read the broker at this scrape", None),
        "workers": ("Remote workers by heartbeat state", ["state"]),
        "worker_heartbeat_age_seconds": ("Seconds since a worker's last heartbeat", ["worker"]),
        "worker_busy": ("1 while a worker runs a job", ["worker"]),
        "worker_jobs_done": ("Jobs a worker handed back since it started", ["worker"]),
    }
    return {name: GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=labels)
            for name, (text, labels) in specs.items()}


class Metrics:
    """The node's metrics, in a registry of its own (not prometheus_client's global one).

    Wire the scrape-time sources once at start-up with :meth:`attach` (or pass
    them to the constructor), then call the event methods from the stages.
    All methods are thread-safe.
    """

    def __init__(self, *, index: Any = None, queue: Any = None, outbox: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._instances = Counter(
            f"{PREFIX}_instances_received", "Instances received by this process",
            ["transfer_syntax", "calling_ae"], registry=r)
        self._associations = Counter(
            f"{PREFIX}_associations", "Associations requested of this process, by result",
            ["result"], registry=r)
        self._rejections = Counter(
            f"{PREFIX}_rejections", "Associations or instances refused, by reason",
            ["reason"], registry=r)
        self._studies = Counter(
            f"{PREFIX}_studies_completed", "Studies that reached completion (seen here)",
            registry=r)
        self._jobs = Counter(
            f"{PREFIX}_jobs_finished", "Jobs finished, by model and final state",
            ["model", "state"], registry=r)
        self._job_duration = Histogram(
            f"{PREFIX}_job_duration_seconds", "Duration of one job run, by model",
            ["model"], buckets=JOB_DURATION_BUCKETS, registry=r)
        self._turnaround = Histogram(
            f"{PREFIX}_turnaround_seconds",
            "From the last instance of a study received to its results delivered, by model",
            ["model"], buckets=TURNAROUND_BUCKETS, registry=r)
        for result in ("accepted", "rejected"):  # present at 0 from the start
            self._associations.labels(result)
        self._ae = _Capped()
        self._ts = _Capped()
        self._reason = _Capped(50)
        self._model = _Capped(50)
        self.state = _StateCollector()
        r.register(self.state)
        self.attach(index=index, queue=queue, outbox=outbox)

    # -- wiring ---------------------------------------------------------------

    def attach(self, *, index: Any = None, queue: Any = None, outbox: Any = None,
               queue_counts: Callable[[], Mapping[Any, int]] | None = None,
               oldest_pending_age: Callable[[], float | None] | None = None,
               exports: Callable[[], Mapping[str, Mapping[Any, int]]] | None = None,
               index_stats: Callable[[], IndexStats] | None = None,
               jobs_by_model: Callable[[], Mapping[str, Mapping[Any, int]]] | None = None,
               broker: Callable[[], Mapping[str, Any]] | None = None,
               workers: Callable[[], Iterable[Any]] | None = None) -> Metrics:
        """Set the scrape-time sources; ``None`` leaves a source as it was.

        ``index``: a :class:`dicomnode.core.index.Index` (anything with ``stats()``);
        ``queue``: a job queue (``counts()``, ``oldest_pending_age()``);
        ``outbox``: an :class:`~dicomnode.export.outbox.Outbox` (``summary()``).
        The explicit callables override the objects' methods.
        """
        s = self.state
        if queue is not None:
            s.queue_counts = queue.counts
            s.oldest_pending_age = queue.oldest_pending_age
        if outbox is not None:
            s.exports = outbox.summary
        if index is not None:
            s.index_stats = index.stats
        if queue_counts is not None:
            s.queue_counts = queue_counts
        if oldest_pending_age is not None:
            s.oldest_pending_age = oldest_pending_age
        if exports is not None:
            s.exports = exports
        if index_stats is not None:
            s.index_stats = index_stats
        if jobs_by_model is not None:  # issue 12: remote workers
            s.jobs_by_model = jobs_by_model
        if broker is not None:
            s.broker = broker
        if workers is not None:
            s.workers = workers
        return self

    # -- events ---------------------------------------------------------------

    def instance_received(self, ts: str, calling_ae: str) -> None:
        """One instance stored and indexed (after the C-STORE/STOW success)."""
        self._instances.labels(self._ts(ts), self._ae(calling_ae)).inc()

    def association(self, accepted: bool, reason: str | None = None) -> None:
        """An association (or a STOW request) was accepted or rejected.

        A rejection with a ``reason`` also counts in ``rejections_total{reason}``;
        use :meth:`rejection` alone for a refusal that is not an association
        (an instance refused inside an accepted association, a STOW part).
        """
        self._associations.labels("accepted" if accepted else "rejected").inc()
        if not accepted and reason:
            self.rejection(reason)

    def rejection(self, reason: str) -> None:
        self._rejections.labels(self._reason(reason)).inc()

    def study_completed(self) -> None:
        self._studies.inc()

    def job_finished(self, model: str, state: Any, seconds: float | None = None) -> None:
        """A job ended (``state``: done / failed / retry, or a JobState)."""
        m = self._model(model)
        self._jobs.labels(m, _label(state)).inc()
        if seconds is not None and seconds >= 0:
            self._job_duration.labels(m).observe(seconds)

    def turnaround(self, model: str, seconds: float) -> None:
        """Last instance of the study received -> its results delivered."""
        if seconds >= 0:
            self._turnaround.labels(self._model(model)).observe(seconds)

    # -- endpoint ---------------------------------------------------------------

    def render(self, *, callers: bool = True) -> tuple[bytes, str]:
        """The body and Content-Type of a ``/metrics`` response.

        ``callers=False`` (an unauthenticated scrape): no calling AE title is listed;
        the series that carry one are summed over it (``calling_ae`` dropped)."""
        if callers:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return generate_latest(_WithoutLabel(self.registry, "calling_ae")), CONTENT_TYPE_LATEST


class _WithoutLabel(Collector):
    """The families of ``registry`` with ``label`` dropped and the samples summed over it."""

    def __init__(self, registry: CollectorRegistry, label: str) -> None:
        self.registry = registry
        self.label = label

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if not any(self.label in s.labels for s in family.samples):
                yield family
                continue
            out = Metric(family.name, family.documentation, family.type, family.unit)
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if k != self.label))
                key = (sample.name, labels)
                if key not in sums:
                    sums[key] = sample.value
                elif sample.name.endswith("_created"):  # a time: the earliest, not a sum
                    sums[key] = min(sums[key], sample.value)
                else:
                    sums[key] += sample.value
            for (name, labels), value in sums.items():
                out.add_sample(name, dict(labels), value)
            yield out


# -- health ----------------------------------------------------------------------


def health(checks: Mapping[str, Check] | None = None) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run every check; ``(all ok, {name: {"ok": bool, "detail": str}})``.

    A check that raises counts as failed with the exception as its detail. With
    no checks (liveness) the answer is ok: the process answered.
    """
    details: dict[str, dict[str, Any]] = {}
    ok_all = True
    for name, check in (checks or {}).items():
        try:
            ok, detail = check()
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        details[name] = {"ok": bool(ok), "detail": str(detail)}
        ok_all = ok_all and bool(ok)
    return ok_all, details


def health_response(checks: Mapping[str, Check] | None = None) -> tuple[int, bytes, str]:
    """``(HTTP status, JSON body, content type)``: 200 when all pass, else 503."""
    ok, details = health(checks)
    body = json.dumps({"status": "ok" if ok else "unavailable", "checks": details},
                      sort_keys=True).encode()
    return (200 if ok else 503), body, "application/json"


def check_storage_writable(path: Path | str) -> Check:
    """A check that creates, fsyncs and removes a probe file in ``path``."""
    folder = Path(path)

    def check() -> tuple[bool, str]:
        probe = folder / f".readyz-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return False, f"storage folder {folder} is not writable: {exc.strerror or exc}"
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        except OSError as exc:
            return False, f"storage folder {folder} cannot be written durably: {exc.strerror or exc}"
        finally:
            os.close(fd)
            try:
                os.unlink(probe)
            except OSError:
                pass
        return True, f"{folder} writable"

    return check


def check_sqlite(path: Path | str, timeout: float = 2.0) -> Check:
    """A check that the SQLite database at ``path`` exists and answers a query.

    Opened read-write without creating it (a missing file fails); reads the
    schema so that a file that is not a database fails too.
    """
    db = Path(path)

    def check() -> tuple[bool, str]:
        if not db.is_file():
            return False, f"database {db} does not exist"
        try:
            conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True,
                                   timeout=timeout)
        except sqlite3.Error as exc:
            return False, f"database {db} cannot be opened: {exc}"
        try:
            t0 = time.monotonic()
            conn.execute("SELECT 1").fetchone()
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return True, f"{db.name} answered in {1000 * (time.monotonic() - t0):.1f} ms"
        except sqlite3.Error as exc:
            return False, f"database {db} does not answer: {exc}"
        finally:
            conn.close()

    return check


def check_scheduler(scheduler: Any) -> Check:
    """A check that an APScheduler scheduler (or a thread-like object) is running.

    ``scheduler`` may be the scheduler itself or a callable returning it (e.g.
    ``lambda: node.scheduler``), so the check can be built before start-up.
    """

    def check() -> tuple[bool, str]:
        s = scheduler() if callable(scheduler) and not hasattr(scheduler, "running") else scheduler
        if s is None:
            return False, "scheduler not started"
        running = getattr(s, "running", None)
        if running is None and hasattr(s, "is_alive"):
            running = s.is_alive()
        if not running:
            return False, "scheduler not running"
        thread = getattr(s, "_thread", None)  # BackgroundScheduler's worker thread
        if thread is not None and not thread.is_alive():
            return False, "scheduler thread has died"
        return True, "running"

    return check


def readiness_checks(storage: Path | str, *, databases: Iterable[Path | str] = (),
                     scheduler: Any = None, audit: Check | None = None,
                     disk: Check | None = None) -> dict[str, Check]:
    """The ``/readyz`` checks: storage writable, each database answers, scheduler runs,
    and, when given, the audit trail writable (``audit``: the recorder's ``health``; the
    node refuses new work while it is not) and free disk above the guard (``disk``).

    E.g. ``readiness_checks(cfg.storage, databases=[Index.path_for(cfg.storage),
    SQLiteJobQueue.path_for(cfg.storage)], scheduler=lambda: node.scheduler)``.
    """
    checks: dict[str, Check] = {"storage": check_storage_writable(storage)}
    for db in databases:
        checks[f"db:{Path(db).name}"] = check_sqlite(db)
    if scheduler is not None:
        checks["scheduler"] = check_scheduler(scheduler)
    if audit is not None:
        checks["audit"] = audit
    if disk is not None:
        checks["disk"] = disk
    return checks


def liveness_checks() -> dict[str, Check]:
    """``/healthz``: none. If the process answers, it is alive."""
    return {}
