"""The DIMSE door stays within bounds (issue 14): memory does not grow with the size of
an instance, idle sockets cannot lock senders out, the port is not open to the network
by default. Real peers (DCMTK storescu/echoscu, pynetdicom) over loopback."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import (
    dataset_offset,
    echoscu,
    make_series,
    run_cli,
    stored_files,
    storescu,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError

MB = 1 << 20
BIG_FRAMES = 800  # 800 frames of 512 x 512 x 16 bits: 419 MB of pixel data
MULTIFRAME_GRAY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


# -- helpers -------------------------------------------------------------------------


def _write_big_instance(path: Path, frames: int) -> str:
    """A multi-frame secondary capture of ``frames`` 512x512 16-bit frames of seeded
    noise, written piece by piece (never whole in memory). Returns the SHA-256 of its
    pixel data value."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_GRAY_WORD_SC
    ds.SOPClassUID = MULTIFRAME_GRAY_WORD_SC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Big^Instance", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    frame_bytes = 512 * 512 * 2
    digest = hashlib.sha256()
    rng = np.random.default_rng(14)
    with path.open("wb") as f:
        ds.save_as(f, enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for _ in range(0, frames, 50):
            chunk = rng.integers(0, 4096, size=50 * frame_bytes // 2, dtype="<u2").tobytes()
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _pixel_data_digest(path: Path) -> str:
    """SHA-256 of the pixel data value of a stored Part 10 file, read in chunks."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    length = int(ds.NumberOfFrames) * int(ds.Rows) * int(ds.Columns) * 2
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(path.stat().st_size - length)
        while chunk := f.read(8 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class _RssSampler:
    """The largest VmRSS of ``pid`` seen while it runs (every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _idle_rss_kb(node: Any) -> int:
    """VmRSS once the node has served an association (its threads and imports warm)."""
    assert echoscu(node.port).returncode == 0
    time.sleep(0.5)
    return _status_kb(node.proc.pid, "VmRSS")


@pytest.fixture(scope="module")
def big_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    digest = _write_big_instance(path, BIG_FRAMES)
    yield path, digest
    path.unlink(missing_ok=True)


# -- bounded memory -------------------------------------------------------------------


def test_a_400_mb_instance_streams_to_disk_in_bounded_memory(
        node_factory: Any, big_instance: tuple[Path, str]) -> None:
    path, digest = big_instance
    assert path.stat().st_size > 400 * 1_000_000
    node = node_factory().start()
    idle = _idle_rss_kb(node)
    with _RssSampler(node.proc.pid) as sampler:
        r = storescu(node.port, [path], extra=["-xe"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + node.log()[-3000:]
    peak = max(_status_kb(node.proc.pid, "VmHWM"), sampler.peak_kb)
    print(f"\nnode RSS idle {idle / 1024:.0f} MB, peak {peak / 1024:.0f} MB while receiving"
          f" a {path.stat().st_size / MB:.0f} MiB instance (+{(peak - idle) / 1024:.0f} MB)")
    assert peak - idle < 150 * 1024, f"RSS grew by {(peak - idle) / 1024:.0f} MB"
    stored = stored_files(node.storage)
    assert len(stored) == 1
    assert _pixel_data_digest(stored[0]) == digest
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    kept = pydicom.dcmread(stored[0], stop_before_pixels=True)
    assert kept.SOPInstanceUID == sent.SOPInstanceUID
    assert kept.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # the data set is exactly what was sent, behind the node's own file meta
    assert (stored[0].stat().st_size - dataset_offset(stored[0])
            == path.stat().st_size - dataset_offset(path))
    assert list((node.storage / "tmp").iterdir()) == []
    assert node.stop() == 0


def test_an_instance_over_the_limit_is_refused_without_being_held(
        node_factory: Any, big_instance: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = big_instance
    node = node_factory({"ingest": {"max_instance_bytes": 50_000_000}}).start()
    idle = _idle_rss_kb(node)
    with _RssSampler(node.proc.pid) as sampler:
        r = storescu(node.port, [path], extra=["-xe", "-v"], timeout=300)
    out = (r.stdout + r.stderr).lower()
    assert "refused: outofresources" in out, out[-2000:]  # 0xA700
    peak = max(_status_kb(node.proc.pid, "VmHWM"), sampler.peak_kb)
    print(f"\nnode RSS idle {idle / 1024:.0f} MB, peak {peak / 1024:.0f} MB while refusing"
          f" a {path.stat().st_size / MB:.0f} MiB instance over a 50 MB limit")
    assert peak - idle < 150 * 1024, f"RSS grew by {(peak - idle) / 1024:.0f} MB"
    assert "larger than the limit" in node.log()
    assert stored_files(node.storage) == []
    assert list((node.storage / "tmp").iterdir()) == []  # nothing partial kept
    small = make_series(tmp_path / "small", n=1)
    assert storescu(node.port, small).returncode == 0
    node.wait_for(lambda: len(stored_files(node.storage)) == 1, timeout=30)
    assert node.stop() == 0


def test_a_pdu_longer_than_advertised_aborts_before_it_is_read(node_factory: Any) -> None:
    node = node_factory().start()
    idle = _idle_rss_kb(node)
    ae = AE(ae_title="HUGEPDU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 256 << 10  # the default we advertise
    # a P-DATA-TF header announcing 1 GB (and a few bytes of it)
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, 1 << 30) + b"\0" * 64)
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert _status_kb(node.proc.pid, "VmHWM") - idle < 150 * 1024
    assert "more than the 262144 allowed" in node.log()
    assert echoscu(node.port).returncode == 0
    assert node.stop() == 0


# -- idle sockets ----------------------------------------------------------------------


def _open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _socket_states(port: int, socks: list[socket.socket]) -> str:
    """What the kernel says of these connections, on both ends (for a failure message)."""
    ports = {s.getsockname()[1] for s in socks}
    try:
        out = subprocess.run(["ss", "-tan"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(ss: {exc})\n"
    lines = [line for line in out.splitlines()
             if any(f":{p} " in line + " " for p in ports) or f":{port} " in line + " "
             and "LISTEN" in line]
    return "\n".join(lines) + "\n"


def test_idle_sockets_do_not_lock_senders_out(node_factory: Any, tmp_path: Path) -> None:
    deadline_s = 4.0
    node = node_factory({"ingest": {"associate_rq_timeout": deadline_s}}).start()
    files = make_series(tmp_path / "in", n=5)
    idle: list[socket.socket] = []
    try:
        # a slow sender: the header of an A-ASSOCIATE-RQ, then a trickle, then nothing
        slow = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        slow.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\0\x01")
        idle.append(slow)
        t_first = time.monotonic()
        times = []
        for i in range(5):
            idle += _open_idle(node.port, 40)  # and 40 more idle sockets each round
            t0 = time.monotonic()
            echo = echoscu(node.port)
            t_echo = time.monotonic() - t0
            t0 = time.monotonic()
            store = storescu(node.port, [files[i]])
            t_store = time.monotonic() - t0
            assert echo.returncode == 0, echo.stdout + echo.stderr + node.log()[-3000:]
            assert store.returncode == 0, store.stdout + store.stderr + node.log()[-3000:]
            times.append((t_echo, t_store))
        print(f"\n{len(idle)} idle sockets; echoscu / storescu seconds per round: "
              + ", ".join(f"{e:.2f}/{s:.2f}" for e, s in times))
        assert all(e < 1.0 and s < 1.0 for e, s in times), times
        assert time.monotonic() - t_first < deadline_s, "rounds took longer than the deadline"
        node.wait_for(lambda: len(stored_files(node.storage)) == 5, timeout=30)
        # every idle socket is closed by the node by the deadline (most at once: over
        # the pending cap, the oldest idle connection of the address gives way)
        # Grace beyond the deadline: the reap runs every poll interval, and on a loaded
        # machine the kernel may hand a connection to the node seconds after the client's
        # connect() returned (its handshake ACK dropped while the accept queue was full;
        # the SYN-ACK is retransmitted after 1, 3, 7 s), so its deadline starts then.
        wait_until = t_first + deadline_s + 12
        late = [s for s in idle
                if not _closed_by_peer(s, max(0.01, wait_until - time.monotonic()))]
        # Seen once under a full parallel load: one socket the node closed (its side in
        # FIN-WAIT-2) just after that bound. Every one must still be closed by the node,
        # within a wider bound; how many came late is printed.
        still_open = [s for s in late
                      if not _closed_by_peer(s, max(0.01, wait_until + 20 - time.monotonic()))]
        print(f"{len(late)} idle socket(s) closed after deadline + 12 s")
        assert not still_open, (
            f"{len(still_open)} idle sockets still open (indexes"
            f" {[idle.index(s) for s in still_open]}):\n"
            + _socket_states(node.port, still_open) + node.log()[-3000:])
        assert "sent no A-ASSOCIATE-RQ in time" in node.log()
    finally:
        for s in idle:
            s.close()
    assert echoscu(node.port).returncode == 0
    assert node.stop() == 0


def test_association_slots_count_only_negotiated_associations(node_factory: Any) -> None:
    """With max_associations 2 and 10 idle sockets (from another pending budget), two
    real associations are served and a third is refused: the idle ones hold no slot."""
    node = node_factory({"ingest": {"max_associations": 2, "max_pending_per_address": 16,
                                    "associate_rq_timeout": 30}}).start()
    idle = _open_idle(node.port, 10)
    ae = AE(ae_title="SLOTS")
    ae.add_requested_context(Verification)
    held = []
    try:
        time.sleep(0.3)
        held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()
        for s in idle:
            s.close()
    assert node.stop() == 0


# -- who may connect ------------------------------------------------------------------


def test_the_dimse_port_is_loopback_by_default() -> None:
    cfg = parse_config({})
    assert cfg.bind_address == "127.0.0.1"
    assert not cfg.open_to_any_caller
    assert cfg.ingest.max_instance_bytes == 5 << 30


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_network_bind_needs_allowed_callers(bind: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"bind_address": bind})
    assert "allowed_callers" in str(err.value)
    ok = parse_config({"bind_address": bind, "allowed_callers": [{"ae_title": "PACS"}]})
    assert not ok.open_to_any_caller
    explicit = parse_config({"bind_address": bind, "accept_any_caller": True})
    assert explicit.open_to_any_caller
    assert parse_config({"bind_address": "::1"}).bind_address == "::1"


def test_config_check_refuses_an_open_network_door(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("bind_address: 0.0.0.0\n")
    r = run_cli("config", "check", str(path))
    assert r.returncode != 0
    assert "allowed_callers" in r.stderr + r.stdout
    path.write_text("bind_address: 0.0.0.0\naccept_any_caller: true\n")
    r = run_cli("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert "warning: accept_any_caller" in r.stderr


# -- the pieces, alone ------------------------------------------------------------------


def test_pending_connections_evict_the_oldest_idle_one_and_reap_late_ones() -> None:
    from dicomnode.ingest.pending import PendingConnections

    now = [0.0]
    pending = PendingConnections(deadline=5, per_address=2, total=3,
                                 monotonic=lambda: now[0])
    pairs = [socket.socketpair() for _ in range(5)]
    try:
        (a, a_peer), (b, b_peer), (c, c_peer), (d, d_peer), (e, e_peer) = pairs
        assert pending.add(a, "10.0.0.1") and pending.add(b, "10.0.0.1")
        a_peer.sendall(b"\x01")  # a's request is arriving: a is not idle
        now[0] = 1.0
        assert pending.add(c, "10.0.0.1")  # over the per-address cap: b (idle) goes
        assert _closed_by_peer(b_peer, 1)
        assert not _closed_by_peer(a_peer, 0.05)
        assert pending.add(d, "10.0.0.2")  # total 3: a, c, d
        pending.done(c)  # c's request arrived
        assert len(pending) == 2
        now[0] = 3.0
        assert pending.add(e, "10.0.0.3")
        now[0] = 6.5  # a (0.0) and d (1.0) are past the deadline, e (3.0) is not
        assert pending.reap() == 2
        assert _closed_by_peer(d_peer, 1)
        assert not _closed_by_peer(e_peer, 0.05)
        assert len(pending) == 1
        pending.close_all()
        assert _closed_by_peer(e_peer, 1)
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def test_a_refused_stream_keeps_nothing(tmp_path: Path) -> None:
    from dicomnode.ingest.diskguard import DiskGuard
    from dicomnode.ingest.spool import Spool
    from dicomnode.ingest.streaming import DatasetStream

    spool = Spool(tmp_path / "spool")
    meta = b"\0" * 128 + b"DICM"
    kept = DatasetStream(spool, meta, limit=10)
    kept.write(memoryview(b"12345"))
    kept.write(memoryview(b"67890"))
    done = kept.finish()
    assert done.path is not None and done.refused is None and done.size == 10
    assert done.path.read_bytes() == meta + b"1234567890"
    with done.header() as head:
        assert bytes(head) == b"1234567890"
    done.discard()
    assert list(spool.tmp.iterdir()) == []

    over = DatasetStream(spool, meta, limit=10)
    over.write(memoryview(b"12345"))
    over.write(memoryview(b"678901"))  # 11 bytes: refused at once, the file removed
    assert list(spool.tmp.iterdir()) == []
    over.write(memoryview(b"x" * 100))  # counted, not kept
    refused = over.finish()
    assert refused.path is None and refused.size == 111
    assert refused.refused is not None and "larger than the limit" in refused.refused

    full = DatasetStream(spool, meta, disk_guard=DiskGuard(tmp_path, min_free_bytes=1 << 62))
    full.write(memoryview(b"12345"))
    out = full.finish()
    assert out.path is None and out.refused is not None and "disk nearly full" in out.refused
    assert list(spool.tmp.iterdir()) == []

    cut = DatasetStream(spool, meta)
    cut.write(memoryview(b"12345"))
    cut.discard()  # the association ended mid-data-set
    assert list(spool.tmp.iterdir()) == []


def test_two_messages_in_one_pdu_and_a_c_store_without_data_set(node_factory: Any) -> None:
    """PS3.8 9.3.5: a P-DATA-TF PDU may carry the last fragment of one message and the
    next message: both are answered. A C-STORE-RQ without a data set gets 0xC000."""
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    node = node_factory().start()
    ae = AE(ae_title="TWOINONE")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assoc._reactor_checkpoint.clear()  # we read the responses ourselves
        while not assoc._is_paused:
            time.sleep(0.001)
        cx = {c.abstract_syntax: c.context_id for c in assoc.accepted_contexts}
        echo = C_ECHO()
        echo.MessageID, echo.AffectedSOPClassUID = 1, Verification
        store = C_STORE()
        store.MessageID, store.Priority = 2, 0
        store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = CTImageStorage, generate_uid()
        pdvs = []
        for prim, msg, context_id in ((echo, C_ECHO_RQ(), cx[Verification]),
                                      (store, C_STORE_RQ(), cx[CTImageStorage])):
            msg.primitive_to_message(prim)
            for p_data in msg.encode_msg(context_id, 0):
                pdvs += [[cx_id, data] for cx_id, data in p_data.presentation_data_value_list]
        both = P_DATA()
        both.presentation_data_value_list = pdvs
        pdu = P_DATA_TF()
        pdu.from_primitive(both)
        assoc.dul.socket.send(pdu.encode())
        answers = {}
        for _ in range(2):
            _, rsp = assoc.dimse.get_msg(block=True)
            assert rsp is not None, node.log()[-3000:]
            answers[rsp.MessageIDBeingRespondedTo] = rsp.Status
        assert answers == {1: 0x0000, 2: 0xC000}
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    assert "without a data set" in node.log()
    assert node.stop() == 0


def test_a_stream_in_pieces_reads_its_header_from_the_file(tmp_path: Path) -> None:
    from dicomnode.ingest import streaming
    from dicomnode.ingest.spool import Spool
    from dicomnode.ingest.streaming import DatasetStream

    spool = Spool(tmp_path / "spool")
    meta = b"\0" * 128 + b"DICM"
    big = bytes(range(256)) * ((streaming.WRITE_BUFFER + 4096) // 256)
    stream = DatasetStream(spool, meta)
    for i in range(0, len(big), 16384):
        stream.write(memoryview(big)[i:i + 16384])
    done = stream.finish()
    assert done.whole is None and done.path is not None  # written in pieces
    assert done.path.read_bytes() == meta + big
    with done.header() as head:
        assert bytes(head[:1000]) == big[:1000] and len(head) == len(big)
    done.discard()
    assert list(spool.tmp.iterdir()) == []
