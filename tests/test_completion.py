"""Completion logic with a mocked clock and scheduler: deterministic, no sleeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.config import CompletionConfig
from dicomnode.core.index import Completion, Index, InstanceRecord
from dicomnode.ingest.completion import CompletionTracker


class FakeScheduler:
    """Records jobs like apscheduler; the test fires them."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def add_job(self, func: Any, trigger: str, run_date: Any, args: list[Any], id: str,
                **_: Any) -> None:
        self.jobs[id] = {"func": func, "run_date": run_date.timestamp(), "args": args}

    def remove_job(self, job_id: str) -> None:
        from apscheduler.jobstores.base import JobLookupError

        if job_id not in self.jobs:
            raise JobLookupError(job_id)
        del self.jobs[job_id]

    def fire_due(self, now: float) -> None:
        for job_id, job in list(self.jobs.items()):
            if job["run_date"] <= now:
                del self.jobs[job_id]
                job["func"](*job["args"])


class Sink:
    def __init__(self) -> None:
        self.got: list[Completion] = []
        self.fail = False

    def study_completed(self, completion: Completion) -> None:
        if self.fail:
            raise RuntimeError("next stage down")
        self.got.append(completion)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _add(index: Index, sop: str, t: float, study: str = "1.2.3", expected: int | None = None) -> None:
    index.add_instance(InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", study, "1.2.3.4",
                                      "1.2.840.10008.1.2", "SCU", 1, t, "x", expected))


def _tracker(tmp_path: Path, **cfg: Any) -> tuple[CompletionTracker, Index, FakeScheduler, Sink, Clock]:
    index = Index(tmp_path / "i.sqlite3")
    sched, sink, clock = FakeScheduler(), Sink(), Clock()
    tracker = CompletionTracker(CompletionConfig(**cfg), index, sched, sink,  # type: ignore[arg-type]
                                clock=clock)
    return tracker, index, sched, sink, clock


def test_quiet_timer_reset_by_each_instance(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=5)
    tracker.start()
    tracker.stop()  # no poll thread needed: the test polls
    _add(index, "1.1", clock.now)
    tracker.poll()
    clock.now += 4
    _add(index, "1.2", clock.now)
    tracker.poll()
    clock.now += 4  # 8 s after the first, 4 after the second: not yet
    sched.fire_due(clock.now)
    assert sink.got == []
    clock.now += 1.5
    sched.fire_due(clock.now)
    assert [(c.revision, c.instance_count) for c in sink.got] == [(1, 2)]
    sched.fire_due(clock.now + 100)
    assert len(sink.got) == 1  # once


def test_instance_unseen_by_poller_postpones(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=5)
    _add(index, "1.1", clock.now)
    tracker.poll()
    clock.now += 4.9
    _add(index, "1.2", clock.now)  # committed, but the poller has not run yet
    clock.now += 0.2
    sched.fire_due(clock.now)
    assert sink.got == [] and sched.jobs  # re-armed from the index's last arrival
    clock.now += 5
    sched.fire_due(clock.now)
    assert len(sink.got) == 1


def test_late_instance_makes_new_revision(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=1)
    _add(index, "1.1", clock.now)
    tracker.poll()
    clock.now += 2
    sched.fire_due(clock.now)
    _add(index, "1.2", clock.now)
    tracker.poll()
    clock.now += 2
    sched.fire_due(clock.now)
    assert [(c.revision, c.instance_count) for c in sink.got] == [(1, 1), (2, 2)]


def test_expected_count(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=60, expected_instances=3)
    for i in range(3):
        _add(index, f"1.{i}", clock.now)
        tracker.poll()
        assert len(sink.got) == (1 if i == 2 else 0)
    assert sink.got[0].reason.startswith("expected count")
    assert not sched.jobs


def test_count_from_header(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(
        tmp_path, quiet_seconds=60, use_number_of_study_related_instances=True)
    _add(index, "1.1", clock.now, expected=2)
    tracker.poll()
    _add(index, "1.2", clock.now, expected=2)
    tracker.poll()
    assert len(sink.got) == 1


def test_association_release(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=60,
                                                  on_association_release=True)
    _add(index, "1.1", clock.now)
    index.record_release("SCU", ["1.2.3"])
    tracker.poll()
    assert [c.reason for c in sink.got] == ["association released"]


def test_restart_rearms_and_retries_handoff(tmp_path: Path) -> None:
    tracker, index, sched, sink, clock = _tracker(tmp_path, quiet_seconds=5)
    _add(index, "1.1", clock.now, study="1.2.3")
    _add(index, "2.1", clock.now, study="1.2.4")
    tracker.poll()
    sink.fail = True  # the next stage is down when 1.2.3 completes
    clock.now += 6
    tracker.scheduler.fire_due(clock.now)  # type: ignore[attr-defined]
    assert sink.got == [] and len(index.pending_handoffs()) == 2
    index.close()
    # "restart": a new tracker over the same index
    tracker2, index2, sched2, sink2, clock2 = _tracker(tmp_path, quiet_seconds=5)
    clock2.now = clock.now
    tracker2.start()
    tracker2.stop()
    assert sorted(c.study_uid for c in sink2.got) == ["1.2.3", "1.2.4"]
    assert index2.pending_handoffs() == []
