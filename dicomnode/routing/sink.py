"""The stage after completion: a completed study revision becomes jobs, by the rules.

``RoutingSink`` reads the study's series from the index, applies the routing rules
(:mod:`dicomnode.routing.rules`) and adds one durable job per decision, keyed by
:class:`~dicomnode.core.layout.JobKey` (study, revision, rule, series, model), so a
repeated hand-off after a crash adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Completion, Index
from dicomnode.core.records import JobPayload
from dicomnode.queue.base import JobQueue, Priority
from dicomnode.routing.rules import decide, read_header, series_info_from_dataset

LOG = logging.getLogger(__name__)


class RoutingSink:
    """Turns each completed study revision into jobs, by the configured rules."""

    def __init__(self, config: NodeConfig, index: Index, queue: JobQueue,
                 on_job: Callable[[], None] | None = None, audit: Audit | None = None) -> None:
        self.config = config
        self.audit: Audit = audit or NullAudit()
        self.index = index
        self.queue = queue
        self.storage = Path(config.storage)
        self._on_job = on_job

    def _keep(self, rule_name: str) -> tuple[str, ...]:
        for rule in self.config.routing:
            if rule.name == rule_name:
                return tuple(rule.keep)
        return ()

    def study_completed(self, completion: Completion) -> None:
        from dicomnode.audit import events

        series = []
        patient = ("", "")
        for series_uid, rows in self.index.study_series(completion.study_uid).items():
            try:
                ds = read_header(self.storage / rows[0].path)
            except Exception as exc:
                LOG.warning("series %s: cannot read a header for routing: %s", series_uid, exc)
                continue
            patient = (str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""))
            series.append(series_info_from_dataset(
                ds, len(rows), calling_ae=rows[0].calling_ae, called_ae=rows[0].called_ae))
        self.audit.record(events.study_completed,
            completion.study_uid, completion.revision, completion.instance_count, *patient)
        decisions = decide(self.config.routing, series)
        for d in decisions:
            self.audit.record(events.rule_matched, completion.study_uid, d.rule, d.model)
        if not decisions:
            self.audit.record(events.rule_matched, completion.study_uid, None, None)
            LOG.info("study %s revision %d: no routing rule matched its %d series; nothing runs",
                     completion.study_uid, completion.revision, len(series))
            return
        for d in decisions:
            payload = JobPayload(
                completion.study_uid, completion.revision, d.series.series_uid, d.rule,
                tuple(self.config.resolve_destinations(d.destinations, d.series.calling_ae)),
                self._keep(d.rule))
            job = self.queue.add(
                str(payload.key(d.model)),
                d.model,
                payload.to_json(),
                priority=Priority.STAT if d.priority == "stat" else Priority.ROUTINE,
                max_attempts=self.config.inference.max_attempts,
            )
            LOG.info("study %s revision %d: rule %s -> model %s on series %s (job %s, %s)",
                     completion.study_uid, completion.revision, d.rule, d.model,
                     d.series.series_uid, job.id, d.priority)
        if self._on_job is not None:
            self._on_job()
