"""What the Celery back-end adds to the queue contract, on a real redis-server: the
hand-offs (a queue per model, STAT before ROUTINE, exactly one message per runnable job,
kept back while Redis is down), claims by job id, permanent failures, the broker's
reconciliation, the background thread, the metrics, and the config that selects it.
The contract itself runs over this back-end in tests/test_queue_contract.py."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from dicomnode.metrics import Metrics
from dicomnode.queue.base import JobState, LeaseLostError, Priority, UnknownJobError
from dicomnode.queue.celery import (
    CeleryJobQueue,
    make_celery_app,
    queue_name,
    redact_url,
    transport_options,
)
from dicomnode.worker.nodeside import check_celery_config
from dicomnode.worker.registry import WorkerRegistry

ROUTINE_LIST = "\x06\x169"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue(tmp_path: Path, redis_server: RedisServer) -> Any:  # noqa: F811
    q = CeleryJobQueue(tmp_path / "jobs.sqlite3", redis_server.url, connect_timeout=1.0,
                       backoff_base=1, backoff_max=1, backoff_jitter=0)
    yield q
    q.close()


def _messages(server: RedisServer, key: str) -> list[dict[str, Any]]:
    out = []
    for raw in server.client().lrange(key, 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append({"id": message["headers"]["id"], "task": message["headers"]["task"],
                    "args": args, "priority": message["properties"]["priority"]})
    return out


def test_one_message_per_job_on_its_models_queue_stat_apart(
        queue: CeleryJobQueue, redis_server: RedisServer) -> None:  # noqa: F811
    routine = queue.add("a", "lung", {"n": 1})
    stat = queue.add("b", "lung", {"n": 2}, priority=Priority.STAT)
    other = queue.add("c", "liver", {"n": 3})
    assert queue.add("a", "lung", {"n": 1}).id == routine.id  # idempotent: no new message
    assert _messages(redis_server, "dicomnode.lung" + ROUTINE_LIST) == [
        {"id": f"dicomnode-job-{routine.id}-1", "task": "dicomnode.run_job",
         "args": [routine.id, "lung"], "priority": 9}]
    assert _messages(redis_server, "dicomnode.lung") == [
        {"id": f"dicomnode-job-{stat.id}-1", "task": "dicomnode.run_job",
         "args": [stat.id, "lung"], "priority": 0}]
    assert [m["args"] for m in _messages(redis_server, "dicomnode.liver" + ROUTINE_LIST)] == [
        [other.id, "liver"]]
    assert queue.dispatch_due() == 0 and queue.handoffs_waiting() == 0
    assert queue.broker_depth() == {
        "dicomnode.lung": {"stat": 1, "routine": 1, "unacked": 0},
        "dicomnode.liver": {"stat": 0, "routine": 1, "unacked": 0}}
    assert queue_name("lung") == "dicomnode.lung"


def test_a_consumer_gets_stat_before_routine(queue: CeleryJobQueue,
                                            redis_server: RedisServer) -> None:  # noqa: F811
    first = queue.add("routine", "lung", {})
    second = queue.add("stat", "lung", {}, priority="stat")
    app = make_celery_app(redis_server.url, visibility_timeout=60)
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue("dicomnode.lung")
        got = [simple.get(timeout=5) for _ in range(2)]
        for m in got:
            m.ack()
        simple.close()
    assert [m.payload[0][0] for m in got] == [second.id, first.id]
    app.close()


def test_claim_leases_the_named_job_only_when_it_is_runnable(tmp_path: Path,
                                                            redis_server: RedisServer) -> None:  # noqa: F811
    clock = Clock()
    queue = CeleryJobQueue(tmp_path / "jobs.sqlite3", redis_server.url, clock=clock,
                           backoff_base=10, backoff_max=10, backoff_jitter=0)
    try:
        a = queue.add("a", "m", {})
        b = queue.add("b", "m", {})
        leased, now = queue.claim(b.id, "w1", 30)
        assert now is None and leased is not None
        assert (leased.state, leased.lease_owner, leased.attempts) == (JobState.LEASED, "w1", 1)
        assert leased.lease_expires == clock.now + 30
        again, held = queue.claim(b.id, "w2", 30)  # a duplicated message
        assert again is None and held is not None and held.lease_owner == "w1"
        queue.release(b.id, "w1", error="boom")  # backs off for 10 s
        early, backing_off = queue.claim(b.id, "w2", 30)
        assert early is None and backing_off is not None
        assert backing_off.state is JobState.PENDING
        clock.now += 10
        assert queue.claim(b.id, "w2", 30)[0] is not None
        with pytest.raises(UnknownJobError):
            queue.claim(999, "w1", 30)
        # a permanent failure: FAILED at once, whatever attempts are left
        queue.claim(a.id, "w1", 30)
        with pytest.raises(LeaseLostError):
            queue.fail(a.id, "w2", "not yours")
        failed = queue.fail(a.id, "w1", "its study is gone")
        assert failed.state is JobState.FAILED and failed.last_error == "its study is gone"
        assert failed.attempts == 1 < failed.max_attempts
    finally:
        queue.close()


def test_while_redis_is_down_jobs_wait_in_the_node_and_go_once_it_is_back(
        queue: CeleryJobQueue, redis_server: RedisServer) -> None:  # noqa: F811
    redis_server.stop()
    started = time.monotonic()
    job = queue.add("k", "m", {})
    assert time.monotonic() - started < 5  # refused at once, not hanging
    assert job.state is JobState.PENDING and queue.get(job.id) == job
    assert queue.broker_up is False and "111" in (queue.broker_error or "")
    assert queue.handoffs_waiting() == 1
    with pytest.raises(Exception):  # noqa: B017 - the broker's connection error
        queue.broker_depth()
    redis_server.start()
    assert queue.dispatch_due() == 1
    assert queue.broker_up is True and queue.handoffs_waiting() == 0
    assert queue.dispatch_due() == 0
    assert len(_messages(redis_server, "dicomnode.m" + ROUTINE_LIST)) == 1


def test_reconcile_puts_back_a_lost_message_and_only_that(
        queue: CeleryJobQueue, redis_server: RedisServer) -> None:  # noqa: F811
    kept = queue.add("kept", "m", {})
    lost = queue.add("lost", "m", {})
    held = queue.add("held", "m", {})
    stuck = queue.add("stuck", "m", {})
    client = redis_server.client()
    key = "dicomnode.m" + ROUTINE_LIST
    by_job = {json.loads(base64.b64decode(json.loads(r)["body"]))[0][0]: r
              for r in client.lrange(key, 0, -1)}
    client.delete(key)
    client.lpush(key, by_job[kept.id])  # still waiting
    # two in a worker's hands (kombu's unacked set): one just taken, one long ago
    now = time.time()
    for job, at in ((held, now), (stuck, now - 3600)):
        tag = f"tag-{job.id}"
        client.hset("unacked", tag, json.dumps([json.loads(by_job[job.id]), "", "dicomnode.m"]))
        client.zadd("unacked_index", {tag: at})
    assert queue.reconcile(min_age=0) == 2  # lost and stuck
    ids = sorted(m["id"] for m in _messages(redis_server, key))
    assert ids == sorted([f"dicomnode-job-{kept.id}-1", f"dicomnode-job-{lost.id}-2",
                          f"dicomnode-job-{stuck.id}-2"])
    assert queue.reconcile(min_age=0) == 0
    assert queue.broker_depth()["dicomnode.m"] == {"stat": 0, "routine": 3, "unacked": 2}


def test_the_background_thread_reaps_and_hands_over_again(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    queue = CeleryJobQueue(tmp_path / "jobs.sqlite3", redis_server.url)
    try:
        job = queue.add("k", "m", {})
        queue.claim(job.id, "dead-worker", 0.3)
        queue.start(interval=0.1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(
                _messages(redis_server, "dicomnode.m" + ROUTINE_LIST)) < 2:
            time.sleep(0.1)
        ids = [m["id"] for m in _messages(redis_server, "dicomnode.m" + ROUTINE_LIST)]
        assert ids == [f"dicomnode-job-{job.id}-2", f"dicomnode-job-{job.id}-1"]
        after = queue.get(job.id)
        assert after is not None and after.state is JobState.PENDING
        assert "lease of dead-worker expired" in (after.last_error or "")
    finally:
        queue.close()


def test_metrics_show_depth_per_model_the_broker_and_the_workers(
        queue: CeleryJobQueue, tmp_path: Path) -> None:
    queue.add("a", "lung", {})
    queue.add("b", "lung", {}, priority="stat")
    queue.add("c", "liver", {})
    registry = WorkerRegistry(queue.path)
    try:
        now = time.time()
        registry.beat(name="gpu1", owner="gpu1:x", host="h", address="10.0.0.7",
                      models=["lung"], device="cuda:0", version="0.1", state="busy", job_id=1,
                      interval=5, started_at=now, jobs_done=3)
        registry.beat(name="gpu2", owner="gpu2:x", host="h", address="10.0.0.8",
                      models=["liver"], device="cuda:0", version="0.1", state="idle",
                      job_id=None, interval=5, started_at=now, jobs_done=0, now=now - 60)
        metrics = Metrics().attach(jobs_by_model=queue.counts_by_model,
                                   broker=lambda: {"queues": queue.broker_depth(), "up": True,
                                                   "handoffs_waiting": queue.handoffs_waiting()},
                                   workers=registry.list)
        text = metrics.render()[0].decode()
    finally:
        registry.close()
    for line in ('dicomnode_jobs_by_model{model="lung",state="pending"} 2.0',
                 'dicomnode_jobs_by_model{model="liver",state="pending"} 1.0',
                 'dicomnode_broker_messages{kind="stat",queue="dicomnode.lung"} 1.0',
                 'dicomnode_broker_messages{kind="routine",queue="dicomnode.lung"} 1.0',
                 'dicomnode_broker_handoffs_waiting 0.0', 'dicomnode_broker_up 1.0',
                 'dicomnode_workers{state="alive"} 1.0', 'dicomnode_workers{state="gone"} 1.0',
                 'dicomnode_worker_busy{worker="gpu1"} 1.0',
                 'dicomnode_worker_jobs_done{worker="gpu1"} 3.0'):
        assert line in text, line
    assert 'dicomnode_worker_heartbeat_age_seconds{worker="gpu2"} 6' in text


def test_config_selects_the_back_end_and_says_what_is_missing() -> None:
    assert parse_config({}).queue.backend == "sqlite"
    with pytest.raises(ConfigError, match="queue: a celery queue needs url"):
        parse_config({"queue": {"backend": "celery"}})
    with pytest.raises(ConfigError, match="queue.url"):
        parse_config({"queue": {"backend": "celery", "url": "amqp://rabbit:5672//"}})
    cfg = parse_config({"queue": {"backend": "celery", "url": "redis://10.0.0.2:6379/3"}})
    with pytest.raises(ConfigError, match="queue.worker_tokens"):
        check_celery_config(cfg)
    token = {"name": "w", "sha256": "ab" * 32}
    short = parse_config({"queue": {"backend": "celery", "url": "redis://h:1/0",
                                    "worker_tokens": [token], "visibility_timeout_seconds": 60},
                          "inference": {"lease_seconds": 300}})
    with pytest.raises(ConfigError, match="visibility_timeout_seconds"):
        check_celery_config(short)
    worker = parse_config({"worker": {"node_url": "https://node:8080", "token": "s3cret"}})
    assert "s3cret" not in repr(worker) and worker.worker.token is not None
    with pytest.raises(ConfigError, match="worker.node_url"):
        parse_config({"worker": {"node_url": "node:8080"}})
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    options = transport_options(7200)
    assert options["visibility_timeout"] == 7200 and options["priority_steps"] == [0, 9]
    assert options["queue_order_strategy"] == "priority"
    app = make_celery_app("redis://h:1/0", visibility_timeout=7200)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    app.close()


def test_a_hand_back_counts_at_once_and_a_late_heartbeat_does_not_undo_it(
        tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path / "jobs.sqlite3")
    beat = {"owner": "gpu1:x", "host": "h", "address": "10.0.0.7", "models": ["lung"],
            "device": "cpu", "version": "0.1", "interval": 5.0}
    try:
        registry.beat(name="gpu1", state="busy", job_id=1, started_at=100.0, jobs_done=0,
                      **beat)
        registry.handed_back("gpu1")
        assert registry.list()[0].jobs_done == 1
        # a heartbeat sent before the worker counted it says 0: the node keeps 1
        assert registry.beat(name="gpu1", state="busy", job_id=1, started_at=100.0,
                             jobs_done=0, **beat).jobs_done == 1
        assert registry.beat(name="gpu1", state="idle", job_id=None, started_at=100.0,
                             jobs_done=1, **beat).jobs_done == 1
        # a restarted worker starts counting again
        assert registry.beat(name="gpu1", state="idle", job_id=None, started_at=200.0,
                             jobs_done=0, **beat).jobs_done == 0
        registry.handed_back("nobody")  # an unknown name changes nothing
        assert [w.name for w in registry.list()] == ["gpu1"]
    finally:
        registry.close()
