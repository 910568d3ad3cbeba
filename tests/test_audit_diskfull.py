"""The audit trail on a real full disk (a small tmpfs filled to ENOSPC): it refuses what
must be durable, holds the rest, and recovers by itself once space is back, with a
chain that verifies without a restart and no record lost or torn."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tmpfs import fill, small_tmpfs

from dicomnode.audit import frames as T
from dicomnode.audit.keys import Keyring
from dicomnode.audit.trail import AuditTrail, AuditUnavailableError
from dicomnode.audit.verify import read, verify
from dicomnode.core.status import Status, status_for


def body(i: int) -> dict[str, object]:
    return {"EventID": "110104", "i": i, "patient": "DOE^JANE", "pad": "p" * 300}


def wait(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.init(tmp_path / "keys")  # the keys stay on the ordinary disk


def test_full_disk_refuses_sync_holds_async_and_recovers_verifiably(tmp_path: Path,
                                                                     keyring: Keyring) -> None:
    with small_tmpfs(tmp_path / "fs", "2m") as fs:
        folder = fs / "audit"
        trail = AuditTrail(folder, keyring, flush_interval=0.005, checkpoint_every=7,
                           retry_seconds=(0.05, 0.2))
        try:
            for i in range(10):
                trail.append(body(i))
            trail.flush()
            assert trail.health()[0]
            filler = fill(fs)

            # plain appends are held in memory; the writer fails, the trail says why
            held = [trail.append(body(100 + i)) for i in range(30)]
            wait(lambda: not trail.health()[0])
            ok, why = trail.health()
            assert "No space left on device" in why and "refused" in why
            # what must be durable is refused at once, as a StorageUnavailableError
            with pytest.raises(AuditUnavailableError) as info:
                trail.append(body(999), sync=True)
            assert status_for(info.value) == Status.OUT_OF_RESOURCES  # 0xA700 / 503
            with pytest.raises(AuditUnavailableError):
                trail.flush()
            time.sleep(0.5)  # several retries fail meanwhile
            assert not trail.health()[0]

            filler.unlink()  # space is back: the writer recovers by itself
            wait(lambda: trail.health()[0])
            trail.flush()
            report = verify(folder, keyring.public_keys)
            assert report.ok, report.summary()
            assert not report.acknowledged_torn  # the failed bytes were cut, not left torn
            later = trail.append(body(200), sync=True)
            assert later > max(held)
        finally:
            trail.close()

        report = verify(folder, keyring.public_keys)
        assert report.ok, report.summary()
        numbers = [b["i"] for _, _, b in read(folder, keyring)]
        # every record appended, in order; the refused sync one is not there
        assert numbers == [*range(10), *range(100, 130), 200]
        controls = [f for _, p in T._segments(folder) for f in T._scan(p.read_bytes())
                    if isinstance(f, T._Frame) and f.type == T.CONTROL]
        failed = [c for c in controls if b'"write_failed"' in c.body]
        assert len(failed) == 1 and b"No space left on device" in failed[0].body


def test_full_disk_at_start_up_refuses_to_open(tmp_path: Path, keyring: Keyring) -> None:
    with small_tmpfs(tmp_path / "fs", "1m") as fs:
        (fs / "audit").mkdir(mode=0o700)
        filler = fill(fs)
        with pytest.raises(T.AuditTrailError):
            AuditTrail(fs / "audit", keyring, retry_seconds=(0.05, 0.1))
        filler.unlink()
        with AuditTrail(fs / "audit", keyring) as trail:  # nothing left locked
            trail.append(body(1), sync=True)
        assert verify(fs / "audit", keyring.public_keys).ok
