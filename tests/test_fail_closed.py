"""The node fails closed on a full disk and recovers by itself; every acknowledged
instance has its transfer record, even after kill -9.

The disk-full tests put the node's storage (index, spool, audit trail, keys) on a small
tmpfs (:mod:`tmpfs`; root only, skipped with the reason elsewhere) and fill it to
ENOSPC; only the node's log stays on the ordinary disk.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import TRANSFERRED, event_name, export, transferred, verify
from conftest import (
    index_query,
    kill9_mid_storescu,
    make_series,
    need_tool,
    storescu,
    study_state,
    uids,
)
from tmpfs import fill, small_tmpfs
from tmpfs import free as free_bytes


def readyz(node: Any) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/readyz",
                                    timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stored(node: Any, study_uid: str) -> int:
    return int(index_query(node.storage, "SELECT count(*) FROM instances WHERE study_uid = ?",
                           (study_uid,))[0][0])


@pytest.mark.timeout(240)
def test_disk_full_refuses_then_recovers_without_restart(node_factory: Any,
                                                         tmp_path: Path) -> None:
    need_tool("storescu")
    before = make_series(tmp_path / "before", n=3, size=32, seed=1)
    during = make_series(tmp_path / "during", n=4, size=32, seed=2)
    after = make_series(tmp_path / "after", n=5, size=32, seed=3)
    with small_tmpfs(tmp_path / "fs", "48m") as fs:
        # no disk-guard margin: the disk really fills, and the audit trail meets ENOSPC
        node = node_factory({"storage": str(fs / "storage"),
                             "retention": {"min_free_gb": 0}})
        node.storage = fs / "storage"
        node.start()
        try:
            assert storescu(node.port, before).returncode == 0
            node.wait_for(lambda: (study_state(node, uids(before[0])[0]) or {}).get("state")
                          == "complete", timeout=30)
            assert readyz(node)[0] == 200

            filler = fill(fs)
            out = storescu(node.port, during, extra=["-v"])
            assert "refused: outofresources" in (out.stdout + out.stderr).lower()  # 0xA700
            assert "Success" not in out.stdout + out.stderr
            assert stored(node, uids(during[0])[0]) == 0

            def not_ready() -> dict[str, Any] | None:
                status, body = readyz(node)
                audit = body["checks"].get("audit", {})
                return body if status == 503 and not audit.get("ok", True) else None

            body = node.wait_for(not_ready, timeout=30, interval=0.2)
            assert "No space left on device" in body["checks"]["audit"]["detail"]
            out = storescu(node.port, during, extra=["-v"])  # refused up front now
            assert "refused: outofresources" in (out.stdout + out.stderr).lower()

            filler.unlink()  # space is back: no restart
            node.wait_for(lambda: readyz(node)[0] == 200, timeout=30, interval=0.2)
            out = storescu(node.port, after)
            assert out.returncode == 0, out.stdout + out.stderr
            study_after = uids(after[0])[0]
            assert stored(node, study_after) == len(after)
            node.wait_for(lambda: not index_query(
                node.storage, "SELECT 1 FROM instances WHERE audit_pending = 1"), timeout=20)

            verify(node)  # the chain verifies while the node runs on, never restarted
            records = export(node)
            assert transferred(records)[study_after] == len(after)
            assert transferred(records)[uids(before[0])[0]] == len(before)
            assert uids(during[0])[0] not in transferred(records)  # nothing of it was stored
            assert "audit trail" in node.log() and "can be written again" in node.log()
        finally:
            assert node.stop() == 0
        verify(node)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kill_at", [7, 80])
def test_kill9_mid_association_every_acknowledged_instance_has_its_record(
        node_factory: Any, tmp_path: Path, kill_at: int) -> None:
    """Killed after ``kill_at`` instances: before the first batch record (7) and after
    one (80, past the 50 of a batch)."""
    need_tool("storescu")
    series = make_series(tmp_path / "series", n=150, size=128, seed=11)
    study = uids(series[0])[0]
    node = node_factory({"completion": {"quiet_seconds": 30.0}}).start()
    log = tmp_path / "storescu.log"
    returncode, acked = kill9_mid_storescu(node, series, log,
                                           lambda: stored(node, study) >= kill_at,
                                           aet="SLOWSCU")
    assert returncode != 0, "storescu finished before the kill: not mid-association"
    assert kill_at - 2 <= len(acked) < len(series)  # the index commit precedes the answer

    node.start()  # writes the records the crash left owed
    held = stored(node, study)
    assert held >= len(acked)
    assert not index_query(node.storage, "SELECT 1 FROM instances WHERE audit_pending = 1")
    assert node.stop() == 0
    records = export(node)
    # every instance held (each acknowledged one among them) is in exactly one record
    assert transferred(records)[study] == held, transferred(records)
    mine = [r for r in records if event_name(r) == TRANSFERRED and any(
        o["ParticipantObjectID"] == study for o in r["event"]["ParticipantObjectIdentification"])]
    restarted = [r for r in mine if "start-up" in json.dumps(r["event"]["EventIdentification"])]
    assert restarted, "no record written at start-up for the instances the crash left owed"
    verify(node)


def _post_stream(port: int, head: bytes, chunks: int, chunk: bytes, tail: bytes) -> bytes:
    """POST over a raw socket, stopping when the node answers or closes; its answer."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(head)
        try:
            for _ in range(chunks):
                s.sendall(chunk)
            s.sendall(tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed before the whole body was sent
        s.settimeout(30)
        answer = b""
        try:
            while len(answer) < 65536 and (data := s.recv(65536)):
                answer += data
                if b"\r\n\r\n" in answer:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return answer
    finally:
        s.close()


@pytest.mark.timeout(180)
def test_stow_part_is_stopped_at_the_disk_guard_not_at_a_full_disk(node_factory: Any,
                                                                   tmp_path: Path) -> None:
    """A 160 MB part into a 64 MB file system whose guard keeps 24 MB free: refused with
    503 by the guard while it is being written, before the disk is full."""
    with small_tmpfs(tmp_path / "fs", "64m") as fs:
        node = node_factory({"storage": str(fs / "storage"),
                             "retention": {"min_free_gb": 0.024}})
        node.storage = fs / "storage"
        node.start()
        try:
            boundary = b"gu4rd"
            first = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
            chunk = b"\0" * (1 << 20)
            tail = b"\r\n--" + boundary + b"--\r\n"
            size = len(first) + 160 * len(chunk) + len(tail)
            head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{node.http_port}\r\n"
                    f'Content-Type: multipart/related; type="application/dicom"; boundary='
                    f"{boundary.decode()}\r\nContent-Length: {size}\r\n\r\n").encode() + first
            answer = _post_stream(node.http_port, head, 160, chunk, tail)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
            log = node.log()
            assert "cannot store the upload now: disk nearly full" in log, log[-3000:]
            assert "No space left on device" not in log
            node.wait_for(lambda: not list((node.storage / "tmp").iterdir()), timeout=10)
            assert free_bytes(fs) > 24_000_000  # the guard's margin was never eaten
        finally:
            assert node.stop() == 0
