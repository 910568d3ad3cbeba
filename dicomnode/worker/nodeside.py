"""How the node (``service.Node``) and ``dicomnode status`` use the queue back-ends.

Kept apart from ``service.py`` so that the node's wiring changes in three marked lines:

* :func:`open_queue` -- SQLite: as before, every lease left by a crash is taken back at
  start-up (only this process runs jobs). Celery: leases are held by workers elsewhere
  and outlive a node restart, so none is taken back; instead every live lease gets one
  more lease period (the node was away: its workers could neither extend their leases nor
  hand back results), then the hand-off thread starts (due jobs to the broker, expired
  leases back, broker reconciled).
* :func:`runs_models_here` -- with Celery, ``serve`` runs no model unless
  ``inference.in_process: true``.
* :class:`RemoteSide` -- the worker API (heartbeats, claims, inputs, results) and its
  metrics.
* :func:`status_report` -- queue depth per model, the broker and the workers, for
  ``dicomnode status``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from dicomnode.config import NodeConfig
from dicomnode.errors import ConfigError
from dicomnode.queue.base import JobState
from dicomnode.queue.sqlite import SQLiteJobQueue

LOG = logging.getLogger(__name__)


def check_celery_config(cfg: NodeConfig) -> None:
    """What ``serve`` needs to hand jobs to remote workers (raises ConfigError)."""
    if cfg.queue.backend != "celery":
        return
    problems = []
    if not cfg.http.enabled:
        problems.append(("http.enabled", "workers reach the node over HTTP: it must be on"))
    if not cfg.queue.worker_tokens and not cfg.inference.in_process:
        problems.append(("queue.worker_tokens", "no worker could reach the node: add a token"
                         " (or set inference.in_process: true)"))
    if cfg.queue.visibility_timeout_seconds <= cfg.inference.lease_seconds:
        problems.append(("queue.visibility_timeout_seconds", "must be longer than"
                         " inference.lease_seconds (and than the slowest job)"))
    if problems:
        raise ConfigError("queue configuration", problems)


def open_queue(cfg: NodeConfig) -> SQLiteJobQueue:
    """The node's job queue, ready to use (see the module docstring)."""
    path = SQLiteJobQueue.path_for(cfg.storage)
    if cfg.queue.backend != "celery":
        queue = SQLiteJobQueue(path, backoff_base=cfg.inference.retry_backoff_seconds,
                               backoff_max=cfg.inference.retry_backoff_max_seconds)
        # only this process leases jobs: whatever is leased now was abandoned by a crash
        reaped = queue.reap_abandoned(now=float("inf"))
        if reaped:
            LOG.warning("%d job(s) were running when the node stopped; they run again", reaped)
        return queue
    from dicomnode.queue.celery import CeleryJobQueue, redact_url

    check_celery_config(cfg)
    assert cfg.queue.url is not None
    cq = CeleryJobQueue(path, cfg.queue.url,
                        visibility_timeout=cfg.queue.visibility_timeout_seconds,
                        backoff_base=cfg.inference.retry_backoff_seconds,
                        backoff_max=cfg.inference.retry_backoff_max_seconds)
    lease = cfg.inference.lease_seconds
    for job in cq.list([JobState.LEASED]):
        if job.lease_owner and cq.extend(job.id, job.lease_owner, lease):
            LOG.info("job %d: lease of %s renewed after the node's restart", job.id,
                     job.lease_owner)
    cq.start(reap=True)
    LOG.info("jobs are handed to workers through %s", redact_url(cfg.queue.url))
    return cq


def runs_models_here(cfg: NodeConfig) -> bool:
    return cfg.queue.backend != "celery" or cfg.inference.in_process


class RemoteSide:
    """The worker API of a node whose queue is on Celery, and its metrics sources."""

    def __init__(self, cfg: NodeConfig, index: Any, queue: Any, *, outbox: Any = None,
                 on_enqueued: Callable[[], None] | None = None, audit: Any = None,
                 metrics: Any = None, withdrawals: Any = None) -> None:
        from dicomnode.web.worker_api import make_worker_api
        from dicomnode.worker.handback import RemoteJobs
        from dicomnode.worker.registry import WorkerRegistry

        self.queue = queue
        self.registry = WorkerRegistry(SQLiteJobQueue.path_for(cfg.storage))
        self.jobs = RemoteJobs(cfg, index, queue, self.registry, outbox=outbox,
                               on_enqueued=on_enqueued, audit=audit, metrics=metrics,
                               withdrawals=withdrawals)
        self.app = make_worker_api(self.jobs, [t.sha256 for t in cfg.queue.worker_tokens],
                                   audit)
        if metrics is not None:
            metrics.attach(jobs_by_model=queue.counts_by_model, broker=self._broker,
                           workers=self.registry.list)
        if cfg.inference.preload and cfg.routing:
            import threading

            threading.Thread(target=self._warm_up, args=(cfg,), name="result-warm-up",
                             daemon=True).start()

    def _warm_up(self, cfg: NodeConfig) -> None:
        """The node still encodes and checks every result: warm that path up once (as the
        in-process worker's preload does), in the background."""
        from dicomnode.encode.objects import kinds_for
        from dicomnode.worker.results import warm_up

        kinds = kinds_for(cfg.destinations, [k for rule in cfg.routing for k in rule.keep])
        if not kinds:
            return
        for name in sorted({r.model for r in cfg.routing}):
            try:
                warm_up(self.jobs.pool.manifest(name), kinds)
            except Exception:
                LOG.exception("warming up the result path for %s failed", name)

    def _broker(self) -> dict[str, Any]:
        out: dict[str, Any] = {"handoffs_waiting": self.queue.handoffs_waiting()}
        try:
            out["queues"] = self.queue.broker_depth()
            out["up"] = True
        except Exception:  # the broker is down: the node says so, and keeps the rest
            out["up"] = False
        return out

    def close(self) -> None:
        self.registry.close()


# -- dicomnode status ----------------------------------------------------------------------


def status_report(cfg: NodeConfig) -> dict[str, Any]:
    """Queue depth per model, the workers' last heartbeats and (Celery) the broker."""
    out: dict[str, Any] = {"backend": cfg.queue.backend, "models": {}, "workers": []}
    path = SQLiteJobQueue.path_for(cfg.storage)
    if not path.exists():
        return out
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        for model, state, n in conn.execute(
                "SELECT model, state, count(*) FROM jobs GROUP BY model, state"):
            out["models"].setdefault(model, {s.value: 0 for s in JobState})[state] = int(n)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    if "workers" in tables:
        from dicomnode.worker.registry import WorkerRegistry

        registry = WorkerRegistry(path)
        try:
            now = time.time()
            out["workers"] = [w.as_dict(now) for w in registry.list()]
        finally:
            registry.close()
    if cfg.queue.backend == "celery" and cfg.queue.url is not None:
        from dicomnode.queue.celery import CeleryJobQueue, redact_url

        broker: dict[str, Any] = {"url": redact_url(cfg.queue.url)}
        queue = CeleryJobQueue(path, cfg.queue.url, connect_timeout=2.0)
        try:
            broker["handoffs_waiting"] = queue.handoffs_waiting()
            try:
                broker["queues"] = queue.broker_depth()
                broker["up"] = True
            except Exception as exc:
                broker["up"] = False
                broker["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            queue.close()
        out["broker"] = broker
    return out


def status_lines(report: dict[str, Any]) -> list[str]:
    """``status_report`` as text lines."""
    lines = []
    for model, states in sorted(report["models"].items()):
        lines.append(f"model {model}: " + ", ".join(f"{n} {s}" for s, n in states.items()))
    broker = report.get("broker")
    if broker is not None:
        if broker.get("up"):
            queues = broker.get("queues") or {}
            depth = "; ".join(f"{q}: {c['stat']} stat, {c['routine']} routine, {c['unacked']}"
                              " running" for q, c in sorted(queues.items())) or "empty"
            lines.append(f"broker {broker['url']}: up; {depth}")
        else:
            lines.append(f"broker {broker['url']}: DOWN ({broker.get('error', '?')})")
        if broker.get("handoffs_waiting"):
            lines.append(f"  {broker['handoffs_waiting']} job(s) wait to be handed to the broker")
    for w in report["workers"]:
        job = f" job {w['job_id']}" if w.get("job_id") is not None else ""
        lines.append(f"worker {w['name']} ({w['host']}, {w['address']}): {w['state']}{job},"
                     f" models {', '.join(w['models'])}, {w['device']}, {w['jobs_done']} done,"
                     f" seen {w['last_seen_seconds_ago']:.0f} s ago")
    return lines

