"""Deciding when a study is complete.

DICOM has no "end of study" message, so the node decides:

* a per-study quiet timer (an apscheduler job) that every new instance resets;
* optionally, the release of the association that brought the study;
* optionally, an expected instance count (fixed, or announced in the headers by
  (0020,1208) Number of Study Related Instances).

The tracker learns about new instances from the index itself (it polls new rows,
and the in-process SCP wakes it at once), so it works the same whether one or
several receiving processes write the index, and after a restart: studies still
receiving are re-armed from their last instance's time. A late instance re-opens a
completed study, which then completes again as a new revision.

Each completion is recorded in the index and handed to a ``CompletionSink`` (the
next stage); a hand-off not confirmed before a crash is repeated at start-up.

A completion that fails on the way (the index cannot be written: "database or disk is
full", "database is locked"; the next stage refuses the hand-off) is not dropped: it
is tried again after 1, 2, 4, ... up to 60 seconds until it goes through, so a study
is routed as soon as the cause has gone, without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler

from dicomnode.config import CompletionConfig
from dicomnode.core.index import Completion, Index
from dicomnode.core.redact import describe_exception

LOG = logging.getLogger(__name__)

#: the first and the longest wait before a failed completion or hand-off is tried again
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class CompletionSink(Protocol):
    """The next stage: receives each completed study revision exactly once per call."""

    def study_completed(self, completion: Completion) -> None: ...


class LoggingSink:
    """The sink used until routing is configured: logs each completion."""

    def study_completed(self, completion: Completion) -> None:
        LOG.info(
            "study %s complete (revision %d, %d instances, %s)",
            completion.study_uid,
            completion.revision,
            completion.instance_count,
            completion.reason,
        )


class CompletionTracker:
    """Arms, resets and fires the per-study completion timers."""

    def __init__(
        self,
        config: CompletionConfig,
        index: Index,
        scheduler: BaseScheduler,
        sink: CompletionSink,
        *,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.index = index
        self.scheduler = scheduler
        self.sink = sink
        self.poll_interval = poll_interval
        self.clock = clock
        self._last_instance_id = 0
        self._last_release_id = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one completion at a time
        self._failures: dict[str, int] = {}  # timer job id -> consecutive failures

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Re-arm pending studies and repeat unconfirmed hand-offs, then start polling."""
        self._last_instance_id, self._last_release_id = self.index.max_ids()
        for completion in self.index.pending_handoffs():
            self._hand_off(completion)
        pending = self.index.receiving_studies()
        for study_uid, last in pending.items():
            self._arm(study_uid, last)
            self._check_count(study_uid)
        if pending:
            LOG.info("re-armed completion timers for %d pending studies", len(pending))
        self._thread = threading.Thread(target=self._poll_loop, name="completion-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def notify(self) -> None:
        """Wake the poller now (an in-process receiver calls it on association release;
        new instances are picked up by the regular poll, every ``poll_interval``)."""
        self._wake.set()

    # -- polling --------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll()
            except Exception:
                LOG.exception("completion poll failed; retrying")
                time.sleep(self.poll_interval)

    def poll(self) -> None:
        """Process instances and association releases indexed since the last poll."""
        self._last_instance_id, studies = self.index.new_instances_since(self._last_instance_id)
        for study_uid, last in studies.items():
            self._arm(study_uid, last)
            self._check_count(study_uid)
        if self.config.on_association_release:
            self._last_release_id, released = self.index.releases_since(self._last_release_id)
            for study_uid in released:
                self.complete(study_uid, "association released")

    # -- timers ---------------------------------------------------------------

    @staticmethod
    def _job_id(study_uid: str) -> str:
        return f"quiet:{study_uid}"

    def _arm(self, study_uid: str, last_received: float) -> None:
        due = datetime.fromtimestamp(last_received + self.config.quiet_seconds, tz=UTC)
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        if due < now:
            due = now + timedelta(milliseconds=1)
        self.scheduler.add_job(
            self._quiet_elapsed,
            trigger="date",
            run_date=due,
            args=[study_uid],
            id=self._job_id(study_uid),
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )

    def _disarm(self, study_uid: str) -> None:
        try:
            self.scheduler.remove_job(self._job_id(study_uid))
        except JobLookupError:
            pass

    def _retry_later(self, job_id: str, what: str, exc: Exception,
                     func: Callable[..., None], *args: object) -> None:
        """Run ``func(*args)`` again after a backoff (the timer ``job_id`` is reused)."""
        n = self._failures[job_id] = self._failures.get(job_id, 0) + 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** min(n - 1, 16))
        LOG.warning("%s failed (%s); trying again in %g s (attempt %d)", what,
                    describe_exception(exc), delay, n + 1)
        self.scheduler.add_job(
            func, trigger="date", run_date=datetime.fromtimestamp(self.clock() + delay, tz=UTC),
            args=list(args), id=job_id, replace_existing=True, misfire_grace_time=None,
            coalesce=True)

    def _quiet_elapsed(self, study_uid: str) -> None:
        job_id = self._job_id(study_uid)
        try:
            self._quiet_check(study_uid)
        except Exception as exc:  # e.g. sqlite3.OperationalError: database or disk is full
            self._retry_later(job_id, f"completion of study {study_uid}", exc,
                              self._quiet_elapsed, study_uid)
            return
        self._failures.pop(job_id, None)

    def _quiet_check(self, study_uid: str) -> None:
        # An instance may have arrived after the timer was set but before the poller
        # saw it: re-check the study's last arrival against the quiet window.
        last = self.index.receiving_studies().get(study_uid)
        if last is None:
            return
        if self.clock() - last < self.config.quiet_seconds - 0.001:
            self._arm(study_uid, last)
            return
        self.complete(study_uid, f"quiet for {self.config.quiet_seconds:g} s")

    def _check_count(self, study_uid: str) -> None:
        cfg = self.config
        if cfg.expected_instances is None and not cfg.use_number_of_study_related_instances:
            return
        held, announced = self.index.study_progress(study_uid)
        expected = cfg.expected_instances
        if cfg.use_number_of_study_related_instances and announced:
            expected = announced
        if expected is not None and held >= expected:
            self.complete(study_uid, f"expected count {expected} reached")

    # -- completion -----------------------------------------------------------

    def complete(self, study_uid: str, reason: str) -> Completion | None:
        """Complete ``study_uid`` now (if it is receiving) and hand it off."""
        with self._lock:
            self._disarm(study_uid)
            completion = self.index.complete_study(study_uid, reason)
        if completion is None:
            return None
        self._hand_off(completion)
        return completion

    def _hand_off(self, completion: Completion) -> None:
        job_id = f"handoff:{completion.id}"
        try:
            self.sink.study_completed(completion)
            self.index.mark_handed_off(completion.id)
        except Exception as exc:  # repeated (and at start-up): the sink is idempotent
            self._retry_later(job_id, f"hand-off of study {completion.study_uid} revision"
                              f" {completion.revision}", exc, self._hand_off, completion)
            return
        self._failures.pop(job_id, None)
