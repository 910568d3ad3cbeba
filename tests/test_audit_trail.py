"""The audit trail (dicomnode.audit.trail) and its keys (dicomnode.audit.keys).

Tampering is done on the real files, byte by byte; `verify` must name the record
(sequence number and kind of damage) each time. The crash test SIGKILLs a real
writer process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.audit import frames as T
from dicomnode.audit.keys import KeyFileError, Keyring, KeyringError, load_public_keys
from dicomnode.audit.trail import AuditTrail, AuditTrailError
from dicomnode.audit.verify import read, verify

PATIENT = "DOE^JANE"


def body(i: int) -> dict:
    return {"EventID": "110104", "i": i, "patient": PATIENT, "pid": f"PID{i:06d}",
            "note": "x" * 40}


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.init(tmp_path / "keys")


def make_trail(folder: Path, keyring: Keyring, n: int = 30, runs: int = 2, **kw) -> None:
    """``runs`` start-ups, ``n`` records each (seq 1 and n+2 are the 'open' records)."""
    kw.setdefault("checkpoint_every", 10)
    for run in range(runs):
        with AuditTrail(folder, keyring, **kw) as trail:
            for i in range(n):
                trail.append(body(run * 1000 + i))


def segments(folder: Path) -> list[Path]:
    return [p for _, p in T._segments(folder)]


def locate(folder: Path, seq: int, rtype: int = T.DATA) -> tuple[Path, T._Frame]:
    for path in segments(folder):
        for f in T._scan(path.read_bytes()):
            if isinstance(f, T._Frame) and f.seq == seq and f.type == rtype:
                return path, f
    raise AssertionError(f"no record {seq}")


def patch(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


def flip(path: Path, offset: int) -> None:
    data = path.read_bytes()
    patch(path, offset, bytes([data[offset] ^ 0x01]))


@pytest.fixture
def trail_dir(tmp_path: Path, keyring: Keyring) -> Path:
    folder = tmp_path / "audit"
    make_trail(folder, keyring)
    return folder


# -- an untouched trail ---------------------------------------------------------

def test_untouched_trail_verifies_and_reads(trail_dir: Path, keyring: Keyring) -> None:
    report = verify(trail_dir, keyring.public_keys)
    assert report.ok, report.summary()
    assert report.records == 62 and report.last_seq == 62 and report.segments == 2
    assert report.signed_through == 62  # closed: a final checkpoint covers everything
    rows = list(read(trail_dir, keyring))
    assert [b["i"] for _, _, b in rows] == list(range(30)) + list(range(1000, 1030))
    assert [s for s, _, _ in rows] == list(range(2, 32)) + list(range(33, 63))
    # with only the public key file, as an auditor would
    assert verify(trail_dir, keyring.folder / "signing-s1.pub.pem").ok
    # nothing readable on disk
    for path in segments(trail_dir):
        raw = path.read_bytes()
        assert PATIENT.encode() not in raw and b"PID000001" not in raw
        assert path.stat().st_mode & 0o777 == 0o600
    assert trail_dir.stat().st_mode & 0o777 == 0o700


# -- tampering ------------------------------------------------------------------

def test_flipped_ciphertext_byte_names_the_record(trail_dir: Path, keyring: Keyring) -> None:
    path, f = locate(trail_dir, 15)
    flip(path, f.end - T.HASH_LEN - 5)  # inside the ciphertext
    report = verify(trail_dir, keyring.public_keys)
    assert not report.ok
    assert (report.first.kind, report.first.seq) == ("modified", 15), report.summary()
    assert report.first.segment == path.name and report.first.offset == f.offset
    assert len(report.problems) == 1  # no cascade
    with pytest.raises(AuditTrailError, match="audit-000001.log"):
        list(read(trail_dir, keyring))


@pytest.mark.parametrize("where", ["time", "prev_hash", "seq", "length", "magic", "hash"])
def test_flipped_header_byte_names_the_record(trail_dir: Path, keyring: Keyring,
                                              where: str) -> None:
    path, f = locate(trail_dir, 20)
    head = f.offset + T._FRAME.size  # start of the header
    offset = {"magic": f.offset + 1, "length": f.offset + 6, "seq": head + 9,
              "time": head + 12, "prev_hash": head + 30, "hash": f.end - 1}[where]
    flip(path, offset)
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("modified", 20), report.summary()
    assert report.first.offset == f.offset


def test_modified_record_with_recomputed_hash_breaks_the_chain(trail_dir: Path,
                                                               keyring: Keyring) -> None:
    path, f = locate(trail_dir, 12)
    raw = bytearray(path.read_bytes()[f.offset:f.end])
    raw[-T.HASH_LEN - 3] ^= 0xFF
    payload = bytes(raw[T._FRAME.size:-T.HASH_LEN])
    patch(path, f.offset, bytes(raw[:-T.HASH_LEN]) + hashlib.sha256(payload).digest())
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("chain_broken", 13), report.summary()
    assert "record 12 modified or deleted" in report.first.message


def test_deleted_record_is_named(trail_dir: Path, keyring: Keyring) -> None:
    path, f = locate(trail_dir, 8)
    data = path.read_bytes()
    path.write_bytes(data[:f.offset] + data[f.end:])
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("deleted", 8), report.summary()
    assert "sequence goes from 7 to 9 (record 8 deleted)" in report.first.message
    assert report.signed_through < 8


def test_swapped_records_are_named(trail_dir: Path, keyring: Keyring) -> None:
    path, a = locate(trail_dir, 16)
    _, b = locate(trail_dir, 17)
    assert a.end == b.offset
    data = path.read_bytes()
    path.write_bytes(data[:a.offset] + data[b.offset:b.end] + data[a.offset:a.end] + data[b.end:])
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("reordered", 16), report.summary()
    assert len(report.problems) == 1, report.summary()


def test_truncated_last_segment_is_named(trail_dir: Path, keyring: Keyring) -> None:
    path, f = locate(trail_dir, 50)
    with open(path, "r+b") as fh:
        fh.truncate(f.offset + 40)
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("torn", 50), report.summary()
    assert f"torn record at offset {f.offset} of segment {path.name}" in report.first.message


def test_truncated_middle_segment_is_named(trail_dir: Path, keyring: Keyring) -> None:
    path, f = locate(trail_dir, 25)
    assert path.name == "audit-000001.log"
    with open(path, "r+b") as fh:
        fh.truncate(f.offset + 7)
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("torn", 25), report.summary()
    assert report.problems[1].kind == "deleted"  # 26.. up to the next segment are gone


def test_deleted_middle_segment_is_named(tmp_path: Path, keyring: Keyring) -> None:
    folder = tmp_path / "audit"
    make_trail(folder, keyring, n=20, runs=3)
    middle = segments(folder)[1]
    first_seq = next(f.seq for f in T._scan(middle.read_bytes()) if isinstance(f, T._Frame))
    middle.unlink()
    report = verify(folder, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("deleted", first_seq), report.summary()
    assert "segment audit-000002.log missing" in report.first.message


def test_checkpoint_signature_is_checked(trail_dir: Path, keyring: Keyring) -> None:
    path, f = locate(trail_dir, 10, T.CHECKPOINT)
    raw = bytearray(path.read_bytes()[f.offset:f.end])
    i = raw.index(b'"signature": "') + 20
    raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
    payload = bytes(raw[T._FRAME.size:-T.HASH_LEN])
    digest = hashlib.sha256(payload).digest()
    patch(path, f.offset, bytes(raw[:-T.HASH_LEN]) + digest)
    report = verify(trail_dir, keyring.public_keys)
    assert (report.first.kind, report.first.seq) == ("bad_signature", 10), report.summary()
    assert "signature of checkpoint at seq 10 invalid" in report.first.message
    # someone else's public key proves nothing
    other = Keyring.init(trail_dir.parent / "other-keys")
    report = verify(trail_dir, other.public_keys)
    assert report.first.kind == "unknown_signer" and report.signed_through == 0


# -- keys -----------------------------------------------------------------------

def test_key_rotation_keeps_old_records_readable(tmp_path: Path, keyring: Keyring) -> None:
    folder = tmp_path / "audit"
    with AuditTrail(folder, keyring) as trail:
        trail.append({"n": "before"})
        trail.flush()
        assert keyring.rotate() == "k2"
        trail.append({"n": "after k2"})
    rotated = Keyring.load(keyring.folder)
    rotated.rotate(signing=True)
    assert rotated.current_key_id == "k3" and rotated.signing_key_id == "s2"
    with AuditTrail(folder, rotated) as trail:
        trail.append({"n": "after k3"})
    frames = [f for p in segments(folder) for f in T._scan(p.read_bytes()) if f.type == T.DATA]
    assert [f.key_id for f in frames] == ["k1", "k2", "k3"]
    assert [b["n"] for _, _, b in read(folder, Keyring.load(keyring.folder))] == [
        "before", "after k2", "after k3"]
    assert verify(folder, keyring.folder).ok  # both public keys, from the folder
    assert set(load_public_keys(keyring.folder)) == {"s1", "s2"}
    report = verify(folder, [keyring.public_keys["s1"]])  # only the old public key
    assert report.first.kind == "unknown_signer"
    # without the old data key the old records cannot be read
    (keyring.folder / "data-k1.json").unlink()
    with pytest.raises(AuditTrailError, match="k1"):
        list(read(folder, Keyring.load(keyring.folder)))


def test_key_files_are_owner_only_even_with_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ring = Keyring.init(tmp_path / "k")
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700
    for p in (tmp_path / "k").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "data-k1.json", "signing-s1.pem", "signing-s1.pub.pem"]
    assert b"PRIVATE" not in (tmp_path / "k" / "signing-s1.pub.pem").read_bytes()
    with pytest.raises(KeyFileError, match="already holds keys"):
        Keyring.init(tmp_path / "k")
    with pytest.raises(KeyringError, match="k9"):
        ring.data_key("k9")


@pytest.mark.parametrize("name,mode", [("data-k1.json", 0o644), ("data-k1.json", 0o640),
                                       ("data-k1.json", 0o606), ("signing-s1.pem", 0o604),
                                       ("signing-s1.pub.pem", 0o666)])
def test_readable_key_file_is_refused(keyring: Keyring, name: str, mode: int) -> None:
    path = keyring.folder / name
    path.chmod(mode)
    with pytest.raises(KeyFileError) as err:
        Keyring.load(keyring.folder)
    assert err.value.path == path and name in str(err.value)


def test_public_key_may_be_world_readable_but_folder_not_writable(keyring: Keyring) -> None:
    (keyring.folder / "signing-s1.pub.pem").chmod(0o644)
    Keyring.load(keyring.folder)
    keyring.folder.chmod(0o777)
    with pytest.raises(KeyFileError, match="chmod 700"):
        Keyring.load(keyring.folder)
    keyring.folder.chmod(0o700)
    link = keyring.folder / "data-k2.json"
    link.symlink_to(keyring.folder / "data-k1.json")
    with pytest.raises(KeyFileError, match="symbolic"):
        Keyring.load(keyring.folder)


# -- crashes --------------------------------------------------------------------

def test_torn_tail_is_reported_quarantined_and_chain_goes_on(
        trail_dir: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture) -> None:
    last = segments(trail_dir)[-1]
    size = last.stat().st_size
    path, f = locate(trail_dir, 40)
    partial = path.read_bytes()[f.offset:f.offset + 50]  # half a frame, as a power cut leaves
    with open(last, "ab") as fh:
        fh.write(partial)
    report = verify(trail_dir, keyring.public_keys)
    assert report.first.kind == "torn" and report.first.offset == size
    with caplog.at_level(logging.WARNING, logger="dicomnode.audit.trail"):
        trail = AuditTrail(trail_dir, keyring)
    assert [(t.segment, t.offset, t.length) for t in trail.recovered] == [(last.name, size, 50)]
    assert f"{last.name}: torn record at byte offset {size}" in caplog.text
    assert (trail_dir / trail.recovered[0].quarantine).read_bytes() == partial
    assert last.stat().st_size == size + 50  # the segment is never rewritten
    seq = trail.append(body(7), sync=True)
    assert seq == 64  # 62 before, 63 is this start-up's 'open' record
    trail.close()
    report = verify(trail_dir, keyring.public_keys)
    assert report.ok, report.summary()
    assert [t.offset for t in report.acknowledged_torn] == [size]
    assert any("torn tail of 50 bytes" in n for n in report.notes)
    assert len(list(read(trail_dir, keyring))) == 61


CHILD = r"""
import sys
from dicomnode.audit.keys import Keyring
from dicomnode.audit.trail import AuditTrail
trail = AuditTrail(sys.argv[1], Keyring.load(sys.argv[2]), flush_interval=0.002,
                   checkpoint_every=50, segment_max_bytes=256 * 1024)
trail.append({"i": -1}, sync=True)
print("ready", flush=True)
i = 0
while True:
    trail.append({"i": i, "patient": "DOE^JANE", "pad": "p" * (i % 700)})
    i += 1
"""


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_while_writing(tmp_path: Path, keyring: Keyring, round_: int,
                              caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "audit"
    make_trail(folder, keyring, n=5, runs=1)
    torn_total = 0
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(keyring.folder)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            time.sleep(random.uniform(0.05, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        last = segments(folder)[-1]
        tail = [i for i in T._scan(last.read_bytes())]
        expected = ([(last.name, tail[-1].offset, last.stat().st_size - tail[-1].offset)]
                    if tail and isinstance(tail[-1], T._Bad) else [])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dicomnode.audit.trail"):
            trail = AuditTrail(folder, keyring)
        assert [(t.segment, t.offset, t.length) for t in trail.recovered] == expected
        for seg, offset, _ in expected:
            assert f"{seg}: torn record at byte offset {offset}" in caplog.text
        torn_total += len(expected)
        trail.append({"after": "restart"}, sync=True)
        trail.close()
        report = verify(folder, keyring.public_keys)
        assert report.ok, report.summary()
        assert len(report.acknowledged_torn) == torn_total
        assert report.signed_through == report.last_seq
    rows = list(read(folder, keyring))
    assert [b for _, _, b in rows].count({"after": "restart"}) == 2


CHILD_TORN = r"""
import os, signal, sys
from dicomnode.audit import trail as T
from dicomnode.audit.keys import Keyring
trail = T.AuditTrail(sys.argv[1], Keyring.load(sys.argv[2]))
for i in range(20):
    trail.append({"i": i, "patient": "DOE^JANE"})
trail.flush()
cut = int(sys.argv[3])

def torn_write(fd, data):  # the process dies between two write() calls of one batch
    os.write(fd, data[:cut])
    os.kill(os.getpid(), signal.SIGKILL)

T._write_all = torn_write
for i in range(20, 30):
    trail.append({"i": i, "patient": "DOE^JANE"})
trail.flush()
"""


@pytest.mark.parametrize("cut", [5, 310, 1234, 300])  # 300: two whole frames of 150 bytes
def test_kill_9_in_the_middle_of_a_batch(tmp_path: Path, keyring: Keyring, cut: int,
                                         caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "audit"
    done = subprocess.run([sys.executable, "-c", CHILD_TORN, str(folder), str(keyring.folder),
                           str(cut)], timeout=60)
    assert done.returncode == -signal.SIGKILL
    (last,) = segments(folder)
    frames = [f for f in T._scan(last.read_bytes()) if isinstance(f, T._Frame)]
    good_end = frames[-1].end
    size = last.stat().st_size
    with caplog.at_level(logging.WARNING, logger="dicomnode.audit.trail"):
        trail = AuditTrail(folder, keyring)
    if good_end == size:  # the kill fell between two frames: nothing torn, nothing reported
        assert trail.recovered == [] and "torn" not in caplog.text
    else:
        (torn,) = trail.recovered
        assert (torn.segment, torn.offset, torn.length) == (last.name, good_end, size - good_end)
        assert f"{last.name}: torn record at byte offset {good_end}" in caplog.text
    assert trail.last_seq == frames[-1].seq + 1  # the chain goes on after the last valid one
    trail.append({"after": "restart"})
    trail.close()
    report = verify(folder, keyring.public_keys)
    assert report.ok, report.summary()
    assert [t.offset for t in report.acknowledged_torn] == ([good_end] if good_end < size else [])
    survivors = [b for _, _, b in read(folder, keyring)]
    assert survivors[-1] == {"after": "restart"}
    assert [b["i"] for b in survivors[:-1]] == list(range(len(survivors) - 1))
    assert len(survivors) - 1 >= 20  # everything flushed before the crash is there


# -- writing --------------------------------------------------------------------

def test_group_commit_10k(tmp_path: Path, keyring: Keyring,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 appends share their fsyncs (group commit): what makes an audited C-STORE
    cheap, counted rather than timed (bench/audit.py times it)."""
    fsyncs = [0]
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    folder = tmp_path / "audit"
    with AuditTrail(folder, keyring) as trail:
        seqs = [trail.append(body(i)) for i in range(10_000)]
        trail.flush()
        rows = list(read(folder, keyring))  # durable and readable before close
    # one fsync per batch (plus the folder's): batches of a 50 ms linger, however slow
    # the machine, hold far more than one record each
    assert 0 < fsyncs[0] < 1000, fsyncs[0]
    assert seqs == list(range(2, 10_002))
    assert [b["i"] for _, _, b in rows] == list(range(10_000))
    assert verify(folder, keyring.public_keys).ok


def test_sync_append_threads_and_lock(tmp_path: Path, keyring: Keyring) -> None:
    import threading
    folder = tmp_path / "audit"
    trail = AuditTrail(folder, keyring, flush_interval=10.0)
    with pytest.raises(AuditTrailError, match="another process"):
        AuditTrail(folder, keyring)
    start = time.perf_counter()
    seq = trail.append({"a": 1}, sync=True)  # does not wait for the 10 s linger
    assert time.perf_counter() - start < 2.0
    assert [s for s, _, _ in read(folder, keyring)] == [seq]
    out: list[int] = []

    def work(k: int) -> None:
        out.extend(trail.append({"t": k, "j": j}) for j in range(500))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trail.close()
    assert sorted(out) == list(range(seq + 1, seq + 2001))
    assert verify(folder, keyring.public_keys).ok
    with pytest.raises(AuditTrailError, match="closed"):
        trail.append({"late": True})


def test_read_filters_by_time_and_validates(tmp_path: Path, keyring: Keyring) -> None:
    folder = tmp_path / "audit"
    with AuditTrail(folder, keyring) as trail:
        trail.append({"n": 1}, sync=True)
        time.sleep(0.02)
        middle = datetime.now(UTC)
        time.sleep(0.02)
        trail.append(b'{"n": 2}')
    assert [b["n"] for _, _, b in read(folder, keyring, since=middle)] == [2]
    assert [b["n"] for _, _, b in read(folder, keyring, until=middle)] == [1]
    assert list(read(folder, keyring, since=middle + timedelta(days=1))) == []
    with pytest.raises(ValueError, match="since"):
        list(read(folder, keyring, since=datetime.now()))


def test_bad_arguments_are_refused(tmp_path: Path, keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="segment_max_bytes"):
        AuditTrail(tmp_path / "a", keyring, segment_max_bytes=10)
    with pytest.raises(ValueError, match="flush_interval"):
        AuditTrail(tmp_path / "a", keyring, flush_interval=-1)
    with AuditTrail(tmp_path / "a", keyring) as trail:
        with pytest.raises(ValueError, match="body"):
            trail.append(b"not json")
        with pytest.raises(TypeError, match="body"):
            trail.append("a string")  # type: ignore[arg-type]


def test_checkpoint_after_seconds_while_open(tmp_path: Path, keyring: Keyring) -> None:
    folder = tmp_path / "audit"
    with AuditTrail(folder, keyring, checkpoint_every=1000, checkpoint_seconds=0.1) as trail:
        seq = trail.append({"a": 1}, sync=True)
        report = verify(folder, keyring.public_keys)
        assert report.ok and report.signed_through < seq
        assert any("not covered by a checkpoint signature" in n for n in report.notes)
        deadline = time.monotonic() + 5
        while verify(folder, keyring.public_keys).signed_through < seq:
            assert time.monotonic() < deadline, "no timed checkpoint"
            time.sleep(0.05)
