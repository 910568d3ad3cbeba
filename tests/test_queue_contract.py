"""The job queue contract, run against every back-end.

Every test takes ``queue_factory``, parametrised over :data:`BACKENDS`; a new
back-end joins by adding one entry there and must pass the very same tests
(as apscheduler 3.x runs ``tests/test_jobstores.py`` over all its job stores).
Two are listed: SQLite, and Celery on a real ``redis-server`` (started by this module
on a free loopback port, AOF on, in a temp folder; flushed before each test and
stopped at the end). Broker-specific behaviour is in ``tests/test_queue_celery.py``.

Time is a :class:`FakeClock` moved by the tests: nothing sleeps. The only real
time is in the multi-process test, where leases are far longer than the test.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.queue import (
    Job,
    JobQueue,
    JobState,
    JobStateError,
    LeaseLostError,
    Priority,
    SQLiteJobQueue,
    UnknownJobError,
    backoff_delay,
)

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FixedRandom(random.Random):
    """An RNG whose ``random()`` always returns ``value`` (to pin jitter at its bounds)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class SQLiteSpec:
    """Opens :class:`SQLiteJobQueue` on one file; picklable, so child processes can too."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, **kwargs: Any) -> JobQueue:
        return SQLiteJobQueue(self.path, **kwargs)


class CelerySpec:
    """Opens :class:`CeleryJobQueue` on one SQLite file and one Redis; picklable."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url

    def __call__(self, **kwargs: Any) -> JobQueue:
        from dicomnode.queue.celery import CeleryJobQueue

        return CeleryJobQueue(self.path, self.url, **kwargs)


# Back-ends under test: name -> (tmp_path, broker url -> picklable spec that opens a queue on
# shared storage). Every call of a spec is a new queue object on the same storage: a restart.
BACKENDS: dict[str, Callable[[Path, str], Callable[..., JobQueue]]] = {
    "sqlite": lambda tmp_path, url: SQLiteSpec(tmp_path / "jobs.sqlite3"),
    "celery": lambda tmp_path, url: CelerySpec(tmp_path / "jobs.sqlite3", url),
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One redis-server for this module's Celery runs."""
    from redis_server import RedisServer, redis_binary

    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make test installs it: "
                    "scripts/install-system-deps)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.kill9()


class QueueFactory:
    """Opens queues of one back-end on one storage; closes them all at teardown."""

    def __init__(self, spec: Callable[..., JobQueue]) -> None:
        self.spec = spec
        self.opened: list[JobQueue] = []

    def __call__(self, **kwargs: Any) -> JobQueue:
        queue = self.spec(**kwargs)
        self.opened.append(queue)
        return queue

    def close_all(self) -> None:
        for queue in self.opened:
            queue.close()


@pytest.fixture(params=sorted(BACKENDS))
def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueFactory]:
    url = ""
    if request.param == "celery":
        server = request.getfixturevalue("broker")
        client = server.client()
        client.flushall()
        client.close()
        url = server.url
    factory = QueueFactory(BACKENDS[request.param](tmp_path, url))
    yield factory
    factory.close_all()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(queue_factory: QueueFactory, clock: FakeClock) -> JobQueue:
    return queue_factory(clock=clock, rng=random.Random(1234))


def add_n(queue: JobQueue, n: int, prefix: str = "job", **kwargs: Any) -> list[Job]:
    return [queue.add(f"{prefix}/{i}", "model", {"i": i}, **kwargs) for i in range(n)]


# -- add ----------------------------------------------------------------------


def test_add_returns_a_pending_job_runnable_now(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("1.2.3/1/liver", "liver", {"series": ["1.2.3.4"]}, priority=Priority.STAT)
    assert job.key == "1.2.3/1/liver"
    assert job.model == "liver"
    assert job.payload == {"series": ["1.2.3.4"]}
    assert job.priority is Priority.STAT
    assert job.state is JobState.PENDING
    assert job.attempts == 0
    assert job.max_attempts >= 1
    assert job.not_before == job.created_at == job.updated_at == clock.now
    assert job.lease_owner is None and job.lease_expires is None
    assert job.last_error is None and job.result is None
    assert queue.get(job.id) == job


def test_add_is_idempotent_on_key(queue: JobQueue, clock: FakeClock) -> None:
    first = queue.add("s/1/m", "m", {"a": 1}, priority="routine", max_attempts=2)
    clock.advance(10)
    again = queue.add("s/1/m", "other", {"a": 2}, priority="stat", max_attempts=9)
    assert again == first
    assert len(queue.list()) == 1
    # Still unchanged after it ran: adding the key again does not re-queue it.
    (leased,) = queue.acquire("w", 60)
    done = queue.release(leased.id, "w", result={"ok": True})
    assert queue.add("s/1/m", "m", {"a": 1}) == done
    assert queue.counts()[JobState.DONE] == 1


def test_add_validates_its_arguments(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="key"):
        queue.add("", "m", {})
    with pytest.raises(ValueError, match="model"):
        queue.add("k", "", {})
    with pytest.raises(ValueError, match="payload"):
        queue.add("k", "m", {"x": object()})
    with pytest.raises(ValueError, match="payload"):
        queue.add("k", "m", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        queue.add("k", "m", {}, priority="urgent")
    with pytest.raises(ValueError, match="max_attempts"):
        queue.add("k", "m", {}, max_attempts=0)
    assert queue.list() == []
    assert queue.add("k", "m", {}, priority=0).priority is Priority.STAT


# -- acquire: order -------------------------------------------------------------


def test_stat_before_routine_then_oldest_first(queue: JobQueue, clock: FakeClock) -> None:
    order = [
        ("r1", "routine"),
        ("r2", "routine"),
        ("s1", "stat"),
        ("r3", "routine"),
        ("s2", "stat"),
    ]
    for key, priority in order:
        queue.add(key, "m", {}, priority=priority)
        clock.advance(1)
    got = [queue.acquire("w", 60)[0].key for _ in order]
    assert got == ["s1", "s2", "r1", "r2", "r3"]
    assert queue.acquire("w", 60) == []


def test_fifo_within_a_priority_when_added_at_the_same_instant(queue: JobQueue) -> None:
    added = add_n(queue, 5)
    got = queue.acquire("w", 60, limit=10)
    assert [j.id for j in got] == [j.id for j in added]


def test_acquire_limit_and_batch_order(queue: JobQueue, clock: FakeClock) -> None:
    queue.add("r", "m", {}, priority=Priority.ROUTINE)
    clock.advance(1)
    queue.add("s", "m", {}, priority=Priority.STAT)
    clock.advance(1)
    queue.add("r2", "m", {})
    assert [j.key for j in queue.acquire("w", 60, limit=2)] == ["s", "r"]
    assert [j.key for j in queue.acquire("w", 60, limit=2)] == ["r2"]
    with pytest.raises(ValueError, match="limit"):
        queue.acquire("w", 60, limit=0)
    with pytest.raises(ValueError, match="lease_seconds"):
        queue.acquire("w", 0)
    with pytest.raises(ValueError, match="owner"):
        queue.acquire("", 60)


def test_acquire_max_priority_leases_only_jobs_that_urgent(queue: JobQueue, clock: FakeClock) -> None:
    queue.add("r", "m", {}, priority=Priority.ROUTINE)
    clock.advance(1)
    assert queue.acquire("stat-slot", 60, max_priority=Priority.STAT) == []  # routine stays
    queue.add("s", "m", {}, priority=Priority.STAT)
    assert [j.key for j in queue.acquire("stat-slot", 60, limit=5, max_priority="stat")] == ["s"]
    assert [j.key for j in queue.acquire("w", 60, max_priority=Priority.ROUTINE)] == ["r"]
    with pytest.raises(ValueError, match="priority"):
        queue.acquire("w", 60, max_priority="urgent")


# -- acquire: leases once -------------------------------------------------------


def test_acquire_leases_the_job_and_counts_the_attempt(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("k", "m", {})
    clock.advance(2)
    (leased,) = queue.acquire("worker-a", 30)
    assert leased.id == job.id
    assert leased.state is JobState.LEASED
    assert leased.lease_owner == "worker-a"
    assert leased.lease_expires == clock.now + 30
    assert leased.attempts == 1
    assert leased.updated_at == clock.now
    assert queue.get(job.id) == leased


def test_two_owners_never_get_the_same_job(queue: JobQueue) -> None:
    add_n(queue, 3)
    a = queue.acquire("a", 60, limit=2)
    b = queue.acquire("b", 60, limit=2)
    assert len(a) == 2 and len(b) == 1
    assert not {j.id for j in a} & {j.id for j in b}
    assert queue.acquire("c", 60) == []


def test_threads_acquire_every_job_exactly_once(queue: JobQueue) -> None:
    jobs = add_n(queue, 120)
    n_threads = 8
    start = threading.Barrier(n_threads)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(owner: str) -> None:
        mine: list[int] = []
        rng = random.Random(owner)
        try:
            start.wait(timeout=30)
            while batch := queue.acquire(owner, 300, limit=rng.randint(1, 3)):
                for job in batch:
                    mine.append(job.id)
                    queue.release(job.id, owner, result={"by": owner})
        except BaseException as exc:  # reported below
            errors.append(exc)
        got[owner] = mine

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    all_ids = [i for ids in got.values() for i in ids]
    assert Counter(all_ids) == Counter(j.id for j in jobs)
    for owner, ids in got.items():
        for job_id in ids:
            done = queue.get(job_id)
            assert done is not None and done.state is JobState.DONE
            assert done.result == {"by": owner} and done.attempts == 1


def _process_worker(
    spec: Callable[..., JobQueue],
    owner: str,
    start: Any,
    results: Any,
) -> None:
    """Child process body: take jobs until none is left, report the ids taken."""
    queue = spec()
    mine: list[int] = []
    try:
        start.wait(timeout=60)
        while batch := queue.acquire(owner, 600, limit=2):
            for job in batch:
                mine.append(job.id)
                queue.release(job.id, owner, result={"by": owner})
        results.put((owner, mine, None))
    except BaseException as exc:
        results.put((owner, mine, repr(exc)))
    finally:
        queue.close()


def test_processes_acquire_every_job_exactly_once(queue_factory: QueueFactory) -> None:
    queue = queue_factory()  # real clock: the children use it too
    jobs = add_n(queue, 150)
    ctx = multiprocessing.get_context("spawn")
    n_procs = 3
    start = ctx.Barrier(n_procs)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(queue_factory.spec, f"p{i}", start, results))
        for i in range(n_procs)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # pragma: no cover - only on a hung child
                p.kill()
    assert [r[2] for r in reports] == [None] * n_procs, reports
    all_ids = [i for _, ids, _ in reports for i in ids]
    assert Counter(all_ids) == Counter(j.id for j in jobs)
    for owner, ids, _ in reports:
        for job_id in ids:
            done = queue.get(job_id)
            assert done is not None and done.state is JobState.DONE
            assert done.result == {"by": owner} and done.attempts == 1


# -- extend -----------------------------------------------------------------------


def test_extend_keeps_the_lease(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("k", "m", {})
    queue.acquire("a", 10)
    clock.advance(8)
    assert queue.extend(job.id, "a", 10) is True
    extended = queue.get(job.id)
    assert extended is not None and extended.lease_expires == clock.now + 10
    clock.advance(5)  # past the first expiry, within the extended one
    assert queue.reap_abandoned() == 0
    assert queue.get(job.id) == extended
    assert queue.extend(job.id, "b", 10) is False
    assert queue.extend(10_000, "a", 10) is False
    assert queue.get(job.id) == extended


def test_extend_after_release_is_refused(queue: JobQueue) -> None:
    job = queue.add("k", "m", {})
    queue.acquire("a", 10)
    queue.release(job.id, "a", result={})
    assert queue.extend(job.id, "a", 10) is False


# -- release ------------------------------------------------------------------------


def test_release_success_marks_done_with_result(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("k", "m", {})
    queue.acquire("a", 10)
    clock.advance(3)
    done = queue.release(job.id, "a", result={"seg": "1.2.3", "labels": [1, 2]})
    assert done.state is JobState.DONE
    assert done.result == {"seg": "1.2.3", "labels": [1, 2]}
    assert done.lease_owner is None and done.lease_expires is None
    assert done.updated_at == clock.now
    assert queue.get(job.id) == done
    with pytest.raises(LeaseLostError):
        queue.release(job.id, "a", result={})
    assert queue.acquire("b", 10) == []


def test_release_validates_its_arguments(queue: JobQueue) -> None:
    job = queue.add("k", "m", {})
    (leased,) = queue.acquire("a", 10)
    with pytest.raises(ValueError, match="result"):
        queue.release(job.id, "a", result={"x": 1}, error="boom")
    with pytest.raises(ValueError, match="result"):
        queue.release(job.id, "a", result={"x": object()})
    assert queue.get(job.id) == leased  # nothing changed
    with pytest.raises(UnknownJobError):
        queue.release(10_000, "a", result={})


def test_release_error_backs_off_then_runs_again(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock, backoff_base=10, backoff_max=1000, backoff_jitter=0)
    job = queue.add("k", "m", {}, max_attempts=3)
    queue.acquire("a", 60)
    clock.advance(1)
    back = queue.release(job.id, "a", error="boom")
    assert back.state is JobState.PENDING
    assert back.last_error == "boom"
    assert back.not_before == clock.now + 10
    assert back.lease_owner is None and back.lease_expires is None
    assert back.attempts == 1
    assert queue.acquire("b", 60) == []
    clock.advance(9.999)
    assert queue.acquire("b", 60) == []
    clock.advance(0.001)
    (again,) = queue.acquire("b", 60)
    assert again.id == job.id and again.attempts == 2
    back = queue.release(job.id, "b", error=RuntimeError("out of memory"))
    assert back.last_error == "RuntimeError: out of memory"
    assert back.not_before == clock.now + 20  # doubled


def test_backoff_is_exponential_with_a_ceiling(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock, backoff_base=10, backoff_max=35, backoff_jitter=0)
    job = queue.add("k", "m", {}, max_attempts=6)
    delays = []
    for _ in range(5):
        (leased,) = queue.acquire("w", 60)
        back = queue.release(leased.id, "w", error="boom")
        delays.append(back.not_before - clock.now)
        clock.now = back.not_before
    assert delays == [10, 20, 35, 35, 35]
    assert queue.get(job.id).attempts == 5  # type: ignore[union-attr]


def test_backoff_jitter_is_bounded(queue_factory: QueueFactory, clock: FakeClock) -> None:
    queue = queue_factory(
        clock=clock, backoff_base=10, backoff_max=1000, backoff_jitter=0.5, rng=random.Random(7)
    )
    jobs = add_n(queue, 40)
    queue.acquire("w", 60, limit=40)
    delays = [queue.release(j.id, "w", error="boom").not_before - clock.now for j in jobs]
    assert all(5.0 <= d <= 10.0 for d in delays), delays
    assert len(set(delays)) > 1  # jitter spreads them


def test_backoff_delay_bounds_with_an_injected_rng() -> None:
    lowest = FixedRandom(0.0)
    highest = FixedRandom(1.0 - 2**-53)
    kw: dict[str, Any] = {"base": 10.0, "ceiling": 60.0, "jitter": 0.5}
    assert backoff_delay(1, rng=lowest, **kw) == 10.0
    assert backoff_delay(3, rng=lowest, **kw) == 40.0
    assert backoff_delay(4, rng=lowest, **kw) == 60.0  # ceiling, never above
    assert backoff_delay(10_000, rng=lowest, **kw) == 60.0
    assert 5.0 <= backoff_delay(1, rng=highest, **kw) < 5.0 + 1e-9
    assert 30.0 <= backoff_delay(9, rng=highest, **kw) < 30.0 + 1e-9


def test_backoff_settings_are_validated(queue_factory: QueueFactory) -> None:
    with pytest.raises(ValueError, match="backoff_base"):
        queue_factory(backoff_base=-1)
    with pytest.raises(ValueError, match="backoff_max"):
        queue_factory(backoff_base=10, backoff_max=5)
    with pytest.raises(ValueError, match="backoff_jitter"):
        queue_factory(backoff_jitter=1.5)


def test_max_attempts_fails_the_job_and_keeps_the_error(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("k", "m", {}, max_attempts=2)
    queue.acquire("w", 60)
    back = queue.release(job.id, "w", error="first")
    clock.now = back.not_before
    queue.acquire("w", 60)
    failed = queue.release(job.id, "w", error=ValueError("second"))
    assert failed.state is JobState.FAILED
    assert failed.last_error == "ValueError: second"
    assert failed.attempts == 2
    assert failed.lease_owner is None
    clock.advance(1e6)
    assert queue.acquire("w", 60) == []
    assert queue.reap_abandoned() == 0
    assert queue.get(job.id) == failed


def test_retry_puts_a_failed_job_back(queue: JobQueue, clock: FakeClock) -> None:
    job = queue.add("k", "m", {}, max_attempts=1)
    queue.acquire("w", 60)
    queue.release(job.id, "w", error="boom")
    clock.advance(100)
    retried = queue.retry(job.id)
    assert retried.state is JobState.PENDING
    assert retried.attempts == 0
    assert retried.not_before == clock.now
    assert retried.last_error == "boom"  # history kept until the next outcome
    (again,) = queue.acquire("w", 60)
    assert again.id == job.id and again.attempts == 1
    with pytest.raises(JobStateError):
        queue.retry(job.id)  # leased, not failed
    queue.release(job.id, "w", result={"ok": 1})
    with pytest.raises(JobStateError):
        queue.retry(job.id)  # done
    with pytest.raises(UnknownJobError):
        queue.retry(10_000)


# -- reaping abandoned leases ---------------------------------------------------------


def test_crashed_worker_job_runs_again_exactly_once(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    before = queue_factory(clock=clock)
    job = before.add("k", "m", {"n": 1})
    (leased,) = before.acquire("worker-1", 30)
    before.close()  # the worker's process dies without releasing

    after = queue_factory(clock=clock)  # restart on the same storage
    assert after.reap_abandoned() == 0  # the lease has not expired yet
    assert after.acquire("worker-2", 30) == []
    clock.advance(30)
    assert after.reap_abandoned() == 1
    reaped = after.get(job.id)
    assert reaped is not None
    assert reaped.state is JobState.PENDING
    assert reaped.attempts == 1  # counted when worker-1 took it
    assert reaped.lease_owner is None
    assert reaped.last_error is not None and "expired" in reaped.last_error
    assert after.reap_abandoned() == 0

    (again,) = after.acquire("worker-2", 30)
    assert again.id == job.id and again.attempts == 2 and again.payload == {"n": 1}
    assert after.acquire("worker-3", 30) == []
    assert after.reap_abandoned() == 0
    done = after.release(job.id, "worker-2", result={"ok": True})
    assert done.state is JobState.DONE
    assert after.counts() == {
        JobState.PENDING: 0,
        JobState.LEASED: 0,
        JobState.DONE: 1,
        JobState.FAILED: 0,
    }
    assert leased.lease_owner == "worker-1"


def test_reap_takes_an_explicit_time(queue: JobQueue, clock: FakeClock) -> None:
    add_n(queue, 2)
    queue.acquire("a", 10)
    queue.acquire("b", 20)
    assert queue.reap_abandoned(now=clock.now + 9.999) == 0
    assert queue.reap_abandoned(now=clock.now + 10) == 1
    assert queue.reap_abandoned(now=clock.now + 25) == 1
    assert queue.counts()[JobState.PENDING] == 2


def test_release_after_the_lease_was_reaped_and_taken_raises_lease_lost(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    slow = queue_factory(clock=clock)
    job = slow.add("k", "m", {})
    slow.acquire("slow", 10)
    clock.advance(11)
    other = queue_factory(clock=clock)  # another process, or the node after a restart
    assert other.reap_abandoned() == 1
    (taken,) = other.acquire("fast", 60)
    assert taken.id == job.id

    assert slow.extend(job.id, "slow", 10) is False
    with pytest.raises(LeaseLostError) as info:
        slow.release(job.id, "slow", result={"late": True})
    assert info.value.job_id == job.id
    assert info.value.owner == "slow"
    assert info.value.holder == "fast"
    assert "slow" in str(info.value) and "fast" in str(info.value)
    with pytest.raises(LeaseLostError):
        slow.release(job.id, "slow", error="late failure")
    still = other.get(job.id)
    assert still is not None and still.state is JobState.LEASED and still.lease_owner == "fast"

    done = other.release(job.id, "fast", result={"ok": True})
    assert done.result == {"ok": True}
    assert done.attempts == 2


def test_an_expired_lease_not_yet_reaped_can_still_be_released(
    queue: JobQueue, clock: FakeClock
) -> None:
    job = queue.add("k", "m", {})
    queue.acquire("a", 10)
    clock.advance(60)  # nobody reaped: nobody else can have it
    assert queue.release(job.id, "a", result={"ok": 1}).state is JobState.DONE
    assert queue.reap_abandoned() == 0


def test_lease_expiring_on_the_last_attempt_fails_the_job(
    queue: JobQueue, clock: FakeClock
) -> None:
    job = queue.add("k", "m", {}, max_attempts=2)
    for expected in (JobState.PENDING, JobState.FAILED):
        assert len(queue.acquire("w", 10)) == 1
        clock.advance(10)
        assert queue.reap_abandoned() == 1
        assert queue.get(job.id).state is expected  # type: ignore[union-attr]
    failed = queue.get(job.id)
    assert failed is not None
    assert failed.last_error == "lease expired 2 times"
    assert failed.attempts == 2 and failed.lease_owner is None
    assert queue.acquire("w", 10) == []


# -- inspection ------------------------------------------------------------------------


def test_counts_and_oldest_pending_age(queue_factory: QueueFactory, clock: FakeClock) -> None:
    queue = queue_factory(clock=clock, backoff_base=100, backoff_max=100, backoff_jitter=0)
    assert queue.counts() == dict.fromkeys(JobState, 0)
    assert queue.oldest_pending_age() is None

    a = queue.add("a", "m", {})
    clock.advance(5)
    queue.add("b", "m", {})
    queue.add("c", "m", {}, max_attempts=1)
    clock.advance(2)
    assert queue.oldest_pending_age() == 7
    assert queue.counts() == {
        JobState.PENDING: 3,
        JobState.LEASED: 0,
        JobState.DONE: 0,
        JobState.FAILED: 0,
    }

    (first,) = queue.acquire("w", 60)
    assert first.id == a.id
    assert queue.oldest_pending_age() == 2  # b and c, added 2 s ago
    queue.release(a.id, "w", error="boom")  # a backs off for 100 s
    b, c = queue.acquire("w", 60, limit=2)
    queue.release(b.id, "w", result={})
    queue.release(c.id, "w", error="fatal")
    assert queue.counts() == {
        JobState.PENDING: 1,
        JobState.LEASED: 0,
        JobState.DONE: 1,
        JobState.FAILED: 1,
    }
    assert queue.oldest_pending_age() == 0.0  # a is pending but not runnable yet
    clock.advance(130)
    assert queue.oldest_pending_age() == 30  # runnable for 30 s, nobody took it
    queue.acquire("w", 60)
    assert queue.counts()[JobState.LEASED] == 1
    assert queue.oldest_pending_age() is None


def test_list_filters_by_state(queue: JobQueue) -> None:
    jobs = add_n(queue, 3)
    queue.acquire("w", 60)
    assert [j.id for j in queue.list()] == [j.id for j in jobs]
    assert [j.id for j in queue.list([JobState.LEASED])] == [jobs[0].id]
    assert [j.id for j in queue.list(["pending"])] == [jobs[1].id, jobs[2].id]
    assert len(queue.list([JobState.PENDING, "LEASED"])) == 3
    assert queue.list([JobState.DONE]) == []
    assert queue.get(10_000) is None
    with pytest.raises(ValueError, match="state"):
        queue.list(["running"])


def test_recent_is_the_newest_jobs_first(queue: JobQueue) -> None:
    jobs = add_n(queue, 5)
    queue.acquire("w", 60, limit=2)  # the two oldest
    ids = [j.id for j in jobs]
    assert [j.id for j in queue.recent(3)] == ids[:1:-1]
    assert [j.id for j in queue.recent(10)] == ids[::-1]
    assert [j.id for j in queue.recent(1, ["leased"])] == [ids[1]]
    assert [j.id for j in queue.recent(5, [JobState.PENDING])] == ids[:1:-1]
    assert queue.recent(0) == [] and queue.recent(5, []) == []
    assert queue.recent(2)[0] == queue.get(ids[-1])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            queue.recent(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state"):
        queue.recent(3, ["running"])


def test_everything_persists_across_reopen(queue_factory: QueueFactory, clock: FakeClock) -> None:
    queue = queue_factory(clock=clock)
    add_n(queue, 5, priority=Priority.STAT)
    leased = queue.acquire("w", 60, limit=3)
    queue.release(leased[0].id, "w", result={"uids": ["1.2"]})
    queue.release(leased[1].id, "w", error="boom")
    before = queue.list()
    queue.close()

    reopened = queue_factory(clock=clock)
    assert reopened.list() == before
    assert reopened.counts() == {
        JobState.PENDING: 3,
        JobState.LEASED: 1,
        JobState.DONE: 1,
        JobState.FAILED: 0,
    }
    # The reopened queue honours the lease taken before the restart.
    assert reopened.release(leased[2].id, "w", result={}).state is JobState.DONE


# -- SQLite back-end only ---------------------------------------------------------------


def test_sqlite_queue_shares_the_index_database(tmp_path: Path) -> None:
    from dicomnode.core.index import Index

    index = Index(Index.path_for(tmp_path))
    queue = SQLiteJobQueue(index.path, clock=FakeClock())
    try:
        job = queue.add("s/1/m", "m", {})
        assert queue.get(job.id) == job
        tables = {r[0] for r in index.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "instances", "studies"} <= tables
        conn = queue._conn()  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        queue.close()
        index.close()


def test_sqlite_queue_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path"):
        SQLiteJobQueue(tmp_path / "absent" / "jobs.sqlite3")


def test_real_clock_by_default(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite3")
    try:
        job = queue.add("k", "m", {})
        assert abs(job.created_at - time.time()) < 60
    finally:
        queue.close()


def test_sqlite_queue_closes_connections_of_finished_threads(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite3", clock=FakeClock())
    try:
        for _ in range(5):  # e.g. one lease heartbeat thread per job
            t = threading.Thread(target=queue.counts)
            t.start()
            t.join()
        opened = queue._db._all  # type: ignore[attr-defined]
        assert len(opened) <= 2  # the constructor's thread and the last one
        assert queue.counts()[JobState.PENDING] == 0
    finally:
        queue.close()
