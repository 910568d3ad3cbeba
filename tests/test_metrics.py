"""Metrics (Prometheus text) and the /healthz, /readyz checks."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.core.index import Index, InstanceRecord
from dicomnode.metrics import (
    MAX_LABEL_VALUES,
    OTHER,
    Metrics,
    check_scheduler,
    check_sqlite,
    check_storage_writable,
    health,
    health_response,
    liveness_checks,
    readiness_checks,
)

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_counters_follow_calls() -> None:
    m = Metrics()
    assert value(m, "dicomnode_associations_total", result="accepted") == 0
    assert value(m, "dicomnode_studies_completed_total") == 0
    for _ in range(3):
        m.instance_received(EXPLICIT, "CT1")
    m.instance_received(IMPLICIT, "CT2")
    m.association(True)
    m.association(True)
    m.association(False, "calling AE not allowed")
    m.rejection("instance too large")
    m.study_completed()
    m.job_finished("lung", "done", 2.0)
    m.job_finished("lung", "failed", 30.0)
    m.turnaround("lung", 45.0)
    s = samples(m)
    assert s[("dicomnode_instances_received_total",
              (("calling_ae", "CT1"), ("transfer_syntax", EXPLICIT)))] == 3
    assert s[("dicomnode_instances_received_total",
              (("calling_ae", "CT2"), ("transfer_syntax", IMPLICIT)))] == 1
    assert s[("dicomnode_associations_total", (("result", "accepted"),))] == 2
    assert s[("dicomnode_associations_total", (("result", "rejected"),))] == 1
    assert s[("dicomnode_rejections_total", (("reason", "calling AE not allowed"),))] == 1
    assert s[("dicomnode_rejections_total", (("reason", "instance too large"),))] == 1
    assert s[("dicomnode_studies_completed_total", ())] == 1
    assert s[("dicomnode_jobs_finished_total", (("model", "lung"), ("state", "done")))] == 1
    assert s[("dicomnode_jobs_finished_total", (("model", "lung"), ("state", "failed")))] == 1
    assert s[("dicomnode_job_duration_seconds_count", (("model", "lung"),))] == 2
    assert s[("dicomnode_job_duration_seconds_sum", (("model", "lung"),))] == 32.0
    assert s[("dicomnode_job_duration_seconds_bucket", (("le", "5.0"), ("model", "lung")))] == 1
    assert s[("dicomnode_turnaround_seconds_count", (("model", "lung"),))] == 1
    assert s[("dicomnode_turnaround_seconds_bucket", (("le", "60.0"), ("model", "lung")))] == 1
    assert s[("dicomnode_turnaround_seconds_bucket", (("le", "30.0"), ("model", "lung")))] == 0


def test_registries_are_separate_and_not_global() -> None:
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()
    a.study_completed()
    assert value(a, "dicomnode_studies_completed_total") == 1
    assert value(b, "dicomnode_studies_completed_total") == 0
    assert REGISTRY.get_sample_value("dicomnode_studies_completed_total") is None


def test_hostile_label_values_are_capped() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 50):
        m.instance_received(EXPLICIT, f"AE{i}")
    s = samples(m)
    aes = {dict(k[1])["calling_ae"] for k in s if k[0] == "dicomnode_instances_received_total"}
    assert len(aes) == MAX_LABEL_VALUES + 1
    assert s[("dicomnode_instances_received_total",
              (("calling_ae", OTHER), ("transfer_syntax", EXPLICIT)))] == 50


def test_state_gauges_are_computed_at_scrape_time() -> None:
    depth = {"pending": 2, "leased": 1, "done": 0, "failed": 0}
    age: list[float | None] = [None]
    exports = {"pacs": {"pending": 3, "sent": 10, "failed": 1}}
    m = Metrics().attach(queue_counts=lambda: depth, oldest_pending_age=lambda: age[0],
                         exports=lambda: exports)
    assert value(m, "dicomnode_jobs", state="pending") == 2
    assert value(m, "dicomnode_oldest_pending_job_age_seconds") == 0
    depth["pending"] = 7
    age[0] = 12.5
    exports["pacs"]["failed"] = 4
    assert value(m, "dicomnode_jobs", state="pending") == 7
    assert value(m, "dicomnode_oldest_pending_job_age_seconds") == 12.5
    assert value(m, "dicomnode_exports", destination="pacs", state="pending") == 3
    assert value(m, "dicomnode_exports", destination="pacs", state="failed") == 4
    assert value(m, "dicomnode_metrics_source_up", source="queue") == 1


def test_a_failing_source_does_not_break_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    m = Metrics().attach(queue_counts=broken, exports=lambda: {"pacs": {"failed": 1}})
    m.study_completed()
    s = samples(m)
    assert s[("dicomnode_metrics_source_up", (("source", "queue"),))] == 0
    assert s[("dicomnode_metrics_source_up", (("source", "exports"),))] == 1
    assert s[("dicomnode_studies_completed_total", ())] == 1
    assert not any(k[0] == "dicomnode_jobs" for k in s)


def _rec(i: int, study: str, ts: str, ae: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid=study, series_uid=study + ".1", transfer_syntax=ts, calling_ae=ae,
        size=1000, received_at=time.time(), path=f"x/{i}.dcm")


def test_index_gauges_reflect_the_shared_index(tmp_path: Path) -> None:
    index = Index(Index.path_for(tmp_path))
    try:
        m = Metrics(index=index)
        assert value(m, "dicomnode_index_completions") == 0
        assert value(m, "dicomnode_index_studies", state="receiving") == 0
        for i in range(5):
            index.add_instance(_rec(i, "1.2.9", EXPLICIT, "CT1"))
        index.add_instance(_rec(5, "1.2.8", IMPLICIT, "MR1"))
        assert value(m, "dicomnode_index_instances",
                     transfer_syntax=EXPLICIT, calling_ae="CT1") == 5
        assert value(m, "dicomnode_index_instances",
                     transfer_syntax=IMPLICIT, calling_ae="MR1") == 1
        assert value(m, "dicomnode_index_studies", state="receiving") == 2
        index.complete_study("1.2.9", "quiet")
        assert value(m, "dicomnode_index_studies", state="complete") == 1
        assert value(m, "dicomnode_index_completions") == 1

        # another process' index handle (as a second receiving process would write)
        other = Index(Index.path_for(tmp_path))
        other.add_instance(_rec(6, "1.2.8", IMPLICIT, "MR1"))
        other.close()
        # the scrape runs in an HTTP server thread: its own connection
        got: list[float | None] = []
        t = threading.Thread(target=lambda: got.append(value(
            m, "dicomnode_index_instances", transfer_syntax=IMPLICIT, calling_ae="MR1")))
        t.start()
        t.join()
        assert got == [2]
        assert value(m, "dicomnode_metrics_source_up", source="index") == 1
    finally:
        index.close()


def test_real_queue_and_outbox_attach(tmp_path: Path) -> None:
    from dicomnode.queue.sqlite import SQLiteJobQueue

    queue = SQLiteJobQueue(SQLiteJobQueue.path_for(tmp_path))
    try:
        m = Metrics(queue=queue)
        assert value(m, "dicomnode_jobs", state="pending") == 0
        s = samples(m)
        assert {dict(k[1])["state"] for k in s if k[0] == "dicomnode_jobs"} == {
            "pending", "leased", "done", "failed"}
    finally:
        queue.close()


# -- health -------------------------------------------------------------------------


def test_liveness_is_always_ok() -> None:
    assert health(liveness_checks()) == (True, {})
    status, body, ctype = health_response(liveness_checks())
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["status"] == "ok"


def test_readiness_passes_on_a_healthy_node(tmp_path: Path) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    index = Index(Index.path_for(tmp_path))
    sched = BackgroundScheduler(timezone="UTC")
    sched.start()
    try:
        checks = readiness_checks(tmp_path, databases=[index.path], scheduler=lambda: sched)
        ok, details = health(checks)
        assert ok, details
        assert set(details) == {"storage", "db:index.sqlite3", "scheduler"}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".readyz")] == []
    finally:
        sched.shutdown(wait=True)
        index.close()
    ok, details = health({"scheduler": check_scheduler(sched)})
    assert not ok and details["scheduler"]["detail"] == "scheduler not running"
    ok, details = health({"scheduler": check_scheduler(lambda: None)})
    assert not ok and "not started" in details["scheduler"]["detail"]


def test_readiness_fails_on_a_missing_database(tmp_path: Path) -> None:
    missing = tmp_path / "index.sqlite3"
    status, body, _ = health_response({"db": check_sqlite(missing)})
    assert status == 503
    detail = json.loads(body)["checks"]["db"]
    assert detail["ok"] is False
    assert "does not exist" in detail["detail"] and str(missing) in detail["detail"]
    assert not missing.exists()  # the check never creates the database

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    ok, details = health({"db": check_sqlite(garbage)})
    assert not ok and "does not answer" in details["db"]["detail"]


def test_readiness_fails_on_a_storage_path_that_is_not_a_folder(tmp_path: Path) -> None:
    ok, details = health({"storage": check_storage_writable(tmp_path / "gone")})
    assert not ok
    assert "not writable" in details["storage"]["detail"]
    assert "gone" in details["storage"]["detail"]


def _check_as_unprivileged(folder: Path) -> tuple[bool, dict]:
    """Run the storage check in a forked child; as root, drop to nobody first
    (root writes through any permission bits)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(w, json.dumps(health({"storage": check_storage_writable(folder)})).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    ok, details = json.loads(data)
    return ok, details


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_readiness_fails_on_a_read_only_folder() -> None:
    top = Path(tempfile.mkdtemp(prefix="dicomnode-ro-"))
    ro = top / "storage"
    try:
        os.chmod(top, 0o755)
        ro.mkdir()
        os.chmod(ro, 0o555)
        ok, details = _check_as_unprivileged(ro)
        assert ok is False
        assert "not writable" in details["storage"]["detail"]
        assert "Permission denied" in details["storage"]["detail"]
        assert str(ro) in details["storage"]["detail"]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)
        ro.rmdir()
        top.rmdir()


def test_a_raising_check_fails_clearly() -> None:
    def boom() -> tuple[bool, str]:
        raise OSError(5, "Input/output error")

    ok, details = health({"io": boom, "fine": lambda: (True, "ok")})
    assert not ok
    assert details["io"] == {"ok": False, "detail": "OSError: [Errno 5] Input/output error"}
    assert details["fine"]["ok"] is True
