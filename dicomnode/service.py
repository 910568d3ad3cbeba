"""The node: wires the stages together and owns the lifecycle.

``Node.startup()`` opens the index and spool, re-arms pending completions and starts
receiving; ``Node.run()`` blocks until ``request_stop()`` (the CLI calls it from
SIGTERM/SIGINT); ``Node.shutdown(timeout)`` stops accepting associations, lets
stores in flight finish, stops the timers and flushes the index.

With ``ingest.processes > 1`` the node binds the port itself and hands the
listening socket to that many receiving processes (``dicomnode.ingest.worker``), so
associations do not share one interpreter lock; the completion timers stay in this
process and learn of new instances from the index.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.audit import events
from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.audit.setup import open_audit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index
from dicomnode.core.layout import JobKey, StorageLayout
from dicomnode.export.dispatcher import Dispatcher
from dicomnode.export.outbox import Outbox
from dicomnode.export.senders import make_sender
from dicomnode.ingest.completion import CompletionSink, CompletionTracker, LoggingSink
from dicomnode.ingest.reconcile import backfill_attributes, reconcile
from dicomnode.ingest.scp import StoreSCP
from dicomnode.ingest.spool import Spool
from dicomnode.ingest.transfers import record_pending_transfers
from dicomnode.metrics import Metrics
from dicomnode.queue.sqlite import SQLiteJobQueue
from dicomnode.retention import Purger, PurgeRecovery, RetentionPolicy
from dicomnode.routing.sink import RoutingSink
from dicomnode.withdrawal import RejectionGate
from dicomnode.worker.gpu import GpuScheduler
from dicomnode.worker.inference import InferenceWorker
from dicomnode.worker.nodeside import RemoteSide, open_queue, runs_models_here
from dicomnode.worker.pool import ModelPool

LOG = logging.getLogger(__name__)


def owner_only() -> int:
    """Files and folders the process creates from now on are owner-only (umask 077): the
    index, the job and outbox databases (and SQLite's -wal/-shm files), spool files,
    results, logs of third-party writers. Patient data is never readable by other local
    users, whatever umask the node was started with (``make run`` inherits 022).
    Returns the previous umask."""
    return os.umask(0o077)


def restrict_folder(path: Path) -> None:
    """Make the storage folder owner-only (0700) if group or others may enter it: files
    an earlier version or another umask left readable become unreachable for them."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o700)
            LOG.warning("storage folder %s was %o; made it owner-only (700)", path, mode)
    except OSError as exc:
        LOG.warning("cannot make the storage folder %s owner-only: %s", path, exc.strerror)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Node:
    """One dicomnode service instance."""

    def __init__(self, config: NodeConfig, sink: CompletionSink | None = None,
                 config_source: str = "<embedded defaults>") -> None:
        self.config = config
        self.config_source = config_source
        self.audit: Audit = NullAudit()
        self.purger: Purger | None = None
        self.metrics: Metrics | None = None
        self.http: Any = None
        self._retention_outbox: Outbox | None = None
        self._default_sink = sink is None
        self.sink: CompletionSink = sink or LoggingSink()
        self.queue: SQLiteJobQueue | None = None
        self.remote: RemoteSide | None = None  # issue 12
        self.worker: InferenceWorker | None = None
        self.outbox: Outbox | None = None
        self.dispatcher: Dispatcher | None = None
        self.withdrawals: RejectionGate | None = None
        self.index: Index | None = None
        self.spool: Spool | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.tracker: CompletionTracker | None = None
        self.scp: StoreSCP | None = None
        self.address: tuple[str, int] | None = None
        self._listen_sock: socket.socket | None = None
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._stopping = False
        self._umask: int | None = None
        self._running_marker: Path | None = None
        self.layout = StorageLayout(config.storage)

    # -- startup ----------------------------------------------------------------

    def startup(self) -> None:
        cfg = self.config
        self._umask = owner_only()
        layout = self.layout = StorageLayout(cfg.storage)
        layout.root.mkdir(parents=True, exist_ok=True)
        restrict_folder(layout.root)
        self.audit = open_audit(cfg, "node", forward=True)
        self.audit.record(events.config_loaded, str(self.config_source), True)
        self.spool = Spool(layout.root)
        removed = self.spool.clean_tmp()
        if removed:
            LOG.warning("removed %d partial files left by an earlier crash", removed)
        self.index = Index(layout.index_db)
        # finish purges a crash interrupted, before reconcile could re-index their files
        PurgeRecovery(cfg.storage, self.index, on_purged=self._audit_purge).recover()
        self._running_marker = layout.running_marker
        if self._running_marker.exists():
            LOG.warning("the previous run did not shut down cleanly; checking the index")
            reconcile(self.index, self.spool)
        backfill_attributes(self.index, self.spool)  # an index from before schema 2
        # transfer records a crash left owed (every acknowledged instance gets one)
        record_pending_transfers(self.index, layout.root, self.audit, cfg.ae_title)
        fd = os.open(self._running_marker, os.O_WRONLY | os.O_CREAT, 0o600)
        os.fsync(fd)
        os.close(fd)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.start()
        self.metrics = Metrics(index=self.index)
        if self._default_sink:
            self._start_pipeline()
        self.tracker = CompletionTracker(cfg.completion, self.index, self.scheduler, self.sink)
        self.tracker.start()
        self.metrics.attach(queue=self.queue, outbox=self.outbox)
        if cfg.http.enabled:
            self._start_http()
        if cfg.ingest.processes == 1:
            self.scp = StoreSCP(cfg, self.spool, self.index, on_released=self.tracker.notify,
                                audit=self.audit, metrics=self.metrics)
            self.address = self.scp.start()
        else:
            self._start_workers()
        self.audit.record(events.application_activity, True, cfg.ae_title, socket.gethostname())
        LOG.info(
            "dicomnode %s ready on %s:%d (storage %s)",
            cfg.ae_title,
            self.address[0] if self.address else "?",
            self.address[1] if self.address else 0,
            cfg.storage,
        )

    def _start_pipeline(self) -> None:
        """Routing sink -> durable queue -> in-process inference worker (warm models)."""
        cfg = self.config
        assert self.index is not None
        # SQLite (every lease reaped at start-up) or Celery on Redis (worker/nodeside.py)
        self.queue = open_queue(cfg)
        if cfg.destinations:
            ec = cfg.export
            self.outbox = Outbox(
                cfg.storage,
                backoff_base=ec.retry_base_seconds,
                backoff_max=ec.retry_max_seconds,
                max_age=ec.give_up_after_hours * 3600 if ec.give_up_after_hours else None,
            )
            outbox = self.outbox
            gate = self.withdrawals = RejectionGate(cfg.storage)

            def release_notes(destination: str) -> None:
                """Rejection notes whose new results just went out to ``destination``."""
                gate.release(outbox, destination)

            factory: Any = make_sender
            if any(d.deidentify for d in cfg.destinations):
                from dicomnode.audit.setup import open_keyring
                from dicomnode.export.deidentify import deidentifying_sender_factory

                factory = deidentifying_sender_factory(cfg.storage, open_keyring(cfg))
            self.dispatcher = Dispatcher(outbox, cfg.destinations, cfg.ae_title,
                                         audit=self.audit, on_delivered=self._delivered,
                                         sender_factory=factory,
                                         after_batch=release_notes)
            gate.release(outbox)  # rejection notes whose new results went out before a stop
            self.dispatcher.start()
        if cfg.inference.enabled and cfg.routing and runs_models_here(cfg):  # issue 12
            from dicomnode.inference.device import choose_device

            pool = ModelPool(cfg.models_dir, choose_device(cfg.inference.device))
            device_scheduler = GpuScheduler(pool.device)
            if cfg.inference.preload:
                self._preload(pool, device_scheduler)
            self.worker = InferenceWorker(
                cfg, self.index, self.queue, pool, outbox=self.outbox,
                on_enqueued=self.dispatcher.wake if self.dispatcher else None, audit=self.audit,
                metrics=self.metrics, withdrawals=self.withdrawals, scheduler=device_scheduler,
            )
            self.worker.start()
        self.sink = RoutingSink(cfg, self.index, self.queue,
                                on_job=self.worker.notify if self.worker else None,
                                audit=self.audit)
        if cfg.queue.backend == "celery":  # issue 12: the worker API for remote workers
            self.remote = RemoteSide(cfg, self.index, self.queue, outbox=self.outbox,
                                     on_enqueued=self.dispatcher.wake if self.dispatcher
                                     else None, audit=self.audit, metrics=self.metrics,
                                     withdrawals=self.withdrawals)
        if cfg.retention.enabled:
            self._start_retention()

    def _delivered(self, job_key: str, destination: str) -> None:
        """Turnaround metric: last instance of the study to its results delivered."""
        if self.metrics is None or self.index is None:
            return
        try:
            key = JobKey.parse(job_key)
        except ValueError:
            return
        last = self.index.last_received(key.study_uid)
        if last is not None:
            self.metrics.turnaround(key.model, time.time() - last)

    def _start_http(self) -> None:
        from dicomnode.http import build_app, start_http

        cfg = self.config
        assert self.spool is not None and self.index is not None and self.metrics is not None
        databases = [self.layout.index_db]
        if self.queue is not None:
            databases.append(self.layout.jobs_db)
        app = build_app(cfg, self.spool, self.index, self.metrics, databases,
                        scheduler=lambda: self.scheduler, audit=self.audit,
                        queue=self.queue, outbox=self.outbox or self._retention_outbox,
                        workers=self.remote.app if self.remote else None)
        self.http = start_http(cfg, app)
        LOG.info("HTTP (status page, DICOMweb, /healthz, /readyz, /metrics) on %s://%s:%d",
                 "https" if cfg.http.certfile else "http", cfg.http.bind_address,
                 self.http.port)

    def _preload(self, pool: ModelPool, device_scheduler: GpuScheduler) -> None:
        """Load every routed model onto its device, measure its peak memory there (on a
        GPU), and warm the result path once."""
        from dicomnode.encode.objects import kinds_for
        from dicomnode.worker.results import warm_up

        cfg = self.config
        kinds = kinds_for(cfg.destinations, [k for rule in cfg.routing for k in rule.keep])
        for name in sorted({r.model for r in cfg.routing}):
            try:
                model = pool.get(name)
            except Exception:
                LOG.exception("model %s cannot be loaded; its jobs will fail", name)
                continue
            device_scheduler.profile(name, model)
            if kinds:
                try:
                    warm_up(model.manifest, kinds)
                except Exception:
                    LOG.exception("warming up the result path for %s failed", name)

    def _start_retention(self) -> None:
        cfg = self.config
        assert self.index is not None and self.queue is not None and self.scheduler is not None
        outbox = self.outbox
        if outbox is None and self.layout.outbox.exists():
            outbox = self._retention_outbox = Outbox(cfg.storage)  # deliveries left from before
        rc = cfg.retention
        self.purger = Purger(cfg.storage, self.index, self.queue, outbox,
                             RetentionPolicy(rc.max_age_days, rc.keep_failed_days, rc.dry_run),
                             on_purged=self._audit_purge)
        self.scheduler.add_job(
            self.purger.run_once, "interval", minutes=rc.interval_minutes, id="retention",
            max_instances=1, coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(minutes=1),
        )

    def _audit_purge(self, study_uid: str, instances: int, patient_id: str | None,
                     patient_name: str | None, reason: str) -> None:
        self.audit.record(events.data_purged, study_uid, instances, patient_id, patient_name,
                          reason)

    def _start_workers(self) -> None:
        cfg = self.config
        self._listen_sock = _listening_socket(cfg.bind_address, cfg.port)
        self.address = self._listen_sock.getsockname()[:2]
        for n in range(cfg.ingest.processes):
            self._workers.append(self._spawn_worker(n))

    def _spawn_worker(self, n: int) -> subprocess.Popen[bytes]:
        assert self._listen_sock is not None
        fd = self._listen_sock.fileno()
        payload = self.config.model_dump_json()
        return subprocess.Popen(
            [sys.executable, "-m", "dicomnode.ingest.worker", "--fd", str(fd), "--number", str(n)],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            env={**os.environ, "DICOMNODE_CONFIG_JSON": payload},
        )

    def _check_workers(self) -> None:
        """Restart a receiving process that died (its associations are lost, not acked)."""
        for i, proc in enumerate(self._workers):
            code = proc.poll()
            if code is not None and not self._stopping:
                LOG.error("receiving process %d exited with %s; restarting it", i, code)
                self._workers[i] = self._spawn_worker(i)

    # -- run / stop ---------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Block until ``request_stop()``."""
        while not self._stop.wait(1.0):
            if self._workers:
                self._check_workers()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish stores in flight, stop timers, flush. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        LOG.info("shutting down: no new associations; waiting for stores in flight")
        if self.http is not None:
            self.http.stop()  # no new STOW requests
        if self.scp is not None:
            self.scp.stop(timeout)
        if self._workers:
            if self._listen_sock is not None:
                self._listen_sock.close()
            for proc in self._workers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout + 5
            for proc in self._workers:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.tracker is not None:
            # instances stored by the last associations still get their timers re-armed
            # at the next start-up; poll once so that releases are recorded now
            try:
                self.tracker.poll()
            except Exception:
                LOG.exception("final completion poll failed")
            self.tracker.stop()
        if self.worker is not None:
            self.worker.stop(timeout)
        if self.dispatcher is not None:
            self.dispatcher.stop(timeout)
        if self.outbox is not None:
            self.outbox.close()
        if self.withdrawals is not None:
            self.withdrawals.close()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.queue is not None:
            self.queue.close()
        if self.remote is not None:  # issue 12
            self.remote.close()
        if self._retention_outbox is not None:
            self._retention_outbox.close()
        self.audit.record(events.application_activity, False, self.config.ae_title,
                          socket.gethostname())
        close = getattr(self.audit, "close", None)
        if close is not None:
            close()
        if self.index is not None:
            self.index.close()
            try:
                if self._running_marker is not None:
                    self._running_marker.unlink()
            except OSError:
                pass
        if self._umask is not None:
            os.umask(self._umask)
        LOG.info("shut down cleanly")

