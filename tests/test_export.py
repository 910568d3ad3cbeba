"""Export: the outbox (fake clock, fake senders), the Sender contract over both
implementations, and delivery to a real Orthanc over loopback (DIMSE and STOW-RS),
through outages and restarts."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import DCMTK_ENV, dataset_offset, echoscu, free_port, need_tool
from orthanc import OrthancServer, orthanc  # noqa: F401 - the fixture

from dicomnode.config import Destination
from dicomnode.export.base import (
    DeliveryOutcome,
    Result,
    Sender,
    classify_status,
)
from dicomnode.export.dimse import DimseStoreSender
from dicomnode.export.dispatcher import Dispatcher
from dicomnode.export.outbox import Delivery, DeliveryState, Outbox
from dicomnode.export.senders import make_sender
from dicomnode.export.stowrs import StowRsSender, interpret
from dicomnode.synthetic import make_ct_series

# -- helpers -------------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSender(Sender):
    """Answers each file with ``decide(path)``; counts what it was given."""

    def __init__(self, decide: Callable[[Path], DeliveryOutcome] | None = None) -> None:
        self.decide = decide or (lambda p: DeliveryOutcome.success(p))
        self.calls: list[list[Path]] = []
        self.closed = 0
        self.label = "fake"

    def send(self, files: list[Path]) -> list[DeliveryOutcome]:
        self.calls.append(list(files))
        return [self.decide(f) for f in files]

    def close(self) -> None:
        self.closed += 1

    @property
    def sent(self) -> int:
        return sum(len(c) for c in self.calls)


def dest(name: str = "pacs", **kw: Any) -> Destination:
    fields: dict[str, Any] = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    fields.update(kw)
    return Destination(name=name, **fields)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def ct(tmp_path: Path) -> list[Path]:
    """Five small synthetic CT instances."""
    return make_ct_series(tmp_path / "ct", n_slices=5, rows=16, cols=16)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "node", clock=clock, rng=random.Random(1), backoff_base=10,
                 backoff_max=80, jitter=0.0)
    yield box
    box.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")


# -- status classification ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, Result.OK),
        (0xB000, Result.OK),
        (0xB007, Result.OK),
        (0x0107, Result.OK),
        (0x0111, Result.OK),  # duplicate SOP instance: the peer has it
        (0xA700, Result.TRANSIENT),
        (0xA7FF, Result.TRANSIENT),
        (0x0110, Result.TRANSIENT),
        (0x0213, Result.TRANSIENT),
        (0xA900, Result.PERMANENT),
        (0xC000, Result.PERMANENT),
        (0xC0FF, Result.PERMANENT),
        (0x0122, Result.PERMANENT),
    ],
)
def test_classify_status(code: int, expected: Result) -> None:
    assert classify_status(code) is expected


def test_stow_response_interpretation() -> None:
    body = pydicom.Dataset.from_json({
        "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.1"]}, "00081197": {"vr": "US", "Value": [0x0111]}},
            {"00081155": {"vr": "UI", "Value": ["1.2"]}, "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081155": {"vr": "UI", "Value": ["1.3"]}, "00081197": {"vr": "US", "Value": [0xC000]}},
        ]},
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.4"]}}]},
    })
    got = [(r, status) for r, _, status, _ in interpret(409, body, ["1.1", "1.2", "1.3", "1.4", "1.5"])]
    assert got == [
        (Result.OK, 0x0111),  # 409 + duplicate: ok
        (Result.TRANSIENT, 0xA700),
        (Result.PERMANENT, 0xC000),
        (Result.OK, 0),
        (Result.PERMANENT, 409),  # not mentioned: the HTTP status decides
    ]
    ok_body = pydicom.Dataset.from_json(
        {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.4"]}}]}})
    assert [r for r, *_ in interpret(200, ok_body, ["1.4", "1.5"])] == [
        Result.OK, Result.TRANSIENT]  # 1.5: not acknowledged by a response that lists others
    assert [r for r, *_ in interpret(503, None, ["1.1"])] == [Result.TRANSIENT]
    assert [r for r, *_ in interpret(429, None, ["1.1"])] == [Result.TRANSIENT]
    assert [r for r, *_ in interpret(400, None, ["1.1"])] == [Result.PERMANENT]
    assert [r for r, *_ in interpret(200, None, ["1.1"])] == [Result.OK]


def test_make_sender_picks_the_implementation() -> None:
    dimse = make_sender(dest(), "DICOMNODE")
    stow = make_sender(Destination(name="web", protocol="stowrs",
                                   url="http://127.0.0.1:1/dicom-web/studies/"), "DICOMNODE")
    assert isinstance(dimse, DimseStoreSender)
    assert isinstance(stow, StowRsSender) and stow.url == "http://127.0.0.1:1/dicom-web"


# -- the outbox -----------------------------------------------------------------------------


def test_enqueue_is_idempotent_per_destination_and_object(outbox: Outbox, ct: list[Path]) -> None:
    first = outbox.enqueue("pacs", ct, key="job-1")
    assert len(first) == 5 and all(d.state is DeliveryState.PENDING for d in first)
    again = outbox.enqueue("pacs", ct + ct[:2], key="job-1-rerun")
    assert [d.id for d in again] == [d.id for d in first]
    assert {d.key for d in again} == {"job-1"}  # the first copy wins
    other = outbox.enqueue("viewer", ct[:3])
    assert len(other) == 3
    assert outbox.counts() == {DeliveryState.PENDING: 8, DeliveryState.SENT: 0,
                               DeliveryState.FAILED: 0}
    # one file per object, shared between destinations, with the object's bytes
    objects = sorted(p.name for p in outbox.objects_dir.iterdir())
    assert objects == sorted(f"{sop_uid(p)}.dcm" for p in ct)
    assert first[0].path.read_bytes() == ct[0].read_bytes()
    # a sent delivery is not queued again by a re-run
    outbox.mark_sent([d.id for d in first])
    assert outbox.enqueue("pacs", ct) == outbox.list(DeliveryState.SENT, destination="pacs")
    assert outbox.counts("pacs")[DeliveryState.PENDING] == 0


def test_enqueue_survives_removal_of_the_source(outbox: Outbox, ct: list[Path]) -> None:
    deliveries = outbox.enqueue("pacs", ct)
    shutil.rmtree(ct[0].parent)
    assert all(d.path.is_file() for d in deliveries)


def test_enqueue_rejects_what_is_not_dicom(outbox: Outbox, ct: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(ValueError, match="junk.dcm"):
        outbox.enqueue("pacs", [ct[0], junk])
    with pytest.raises(ValueError, match="destination"):
        outbox.enqueue("no/such name", ct)
    assert outbox.list() == []


def test_backoff_is_exponential_up_to_the_ceiling(outbox: Outbox, clock: FakeClock,
                                                  ct: list[Path]) -> None:
    (d,) = outbox.enqueue("pacs", ct[:1])
    delays = []
    for _ in range(6):
        assert [x.id for x in outbox.due("pacs")] == [d.id]
        (after,) = outbox.mark_failed(d.id, "transient", "connection refused")
        delays.append(after.not_before - clock())
        assert outbox.due("pacs") == []
        clock.advance(delays[-1] - 0.001)
        assert outbox.due("pacs") == []  # not a moment early
        clock.advance(0.001)
    assert delays == [10, 20, 40, 80, 80, 80]
    assert after.state is DeliveryState.PENDING and after.attempts == 6
    assert after.last_result == "transient" and after.last_error == "connection refused"


def test_jitter_stays_within_bounds_and_below_the_ceiling(tmp_path: Path, clock: FakeClock,
                                                          ct: list[Path]) -> None:
    box = Outbox(tmp_path / "j", clock=clock, rng=random.Random(7), backoff_base=4,
                 backoff_max=16, jitter=0.5)
    try:
        ids = [d.id for d in box.enqueue("pacs", ct)]
        seen: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
        for attempt in range(1, 5):
            for d in box.mark_failed(ids, "transient", "down"):
                seen[attempt].append(d.not_before - clock())
            clock.advance(100)
        for attempt, delays in seen.items():
            nominal = min(16, 4 * 2 ** (attempt - 1))
            assert all(nominal * 0.5 <= x <= nominal for x in delays), (attempt, delays)
            assert len(set(delays)) > 1  # spread out, not in lock-step
        assert max(max(v) for v in seen.values()) <= 16
    finally:
        box.close()


def test_permanent_failure_waits_for_a_retry(outbox: Outbox, clock: FakeClock,
                                             ct: list[Path]) -> None:
    a, b = outbox.enqueue("pacs", ct[:2])
    outbox.mark_failed(a.id, Result.PERMANENT, "status 0xC000 (cannot understand)")
    outbox.mark_failed(b.id, Result.TRANSIENT, "timeout")
    got = outbox.get(a.id)
    assert got is not None and got.state is DeliveryState.FAILED
    assert got.last_error == "status 0xC000 (cannot understand)"
    clock.advance(10_000)
    assert [d.id for d in outbox.due("pacs")] == [b.id]  # the permanent one is not due
    assert [d.id for d in outbox.list("failed")] == [a.id]
    assert outbox.retry() == 1  # every failed one
    again = outbox.get(a.id)
    assert again is not None and again.state is DeliveryState.PENDING and again.attempts == 0
    assert {d.id for d in outbox.due("pacs")} == {a.id, b.id}
    # retry by id also makes a backing-off pending delivery due now
    outbox.mark_failed(b.id, "transient", "timeout")
    assert [d.id for d in outbox.due("pacs")] == [a.id]
    assert outbox.retry([b.id]) == 1
    assert {d.id for d in outbox.due("pacs")} == {a.id, b.id}
    with pytest.raises(ValueError):
        outbox.mark_failed(a.id, "ok", "nonsense")


def test_give_up_after_max_attempts_or_max_age(tmp_path: Path, clock: FakeClock,
                                               ct: list[Path]) -> None:
    box = Outbox(tmp_path / "a", clock=clock, backoff_base=1, backoff_max=1, jitter=0,
                 max_attempts=3)
    (d,) = box.enqueue("pacs", ct[:1])
    for _ in range(3):
        (d,) = box.mark_failed(d.id, "transient", "refused")
        clock.advance(1)
    assert d.state is DeliveryState.FAILED and "gave up after 3 attempts" in (d.last_error or "")
    box.close()
    box = Outbox(tmp_path / "b", clock=clock, backoff_base=1, backoff_max=1, jitter=0,
                 max_age=60)
    (d,) = box.enqueue("pacs", ct[:1])
    (d,) = box.mark_failed(d.id, "transient", "refused")
    assert d.state is DeliveryState.PENDING
    clock.advance(61)
    (d,) = box.mark_failed(d.id, "transient", "refused")
    assert d.state is DeliveryState.FAILED and "gave up after 61 s" in (d.last_error or "")
    box.close()


def test_state_survives_reopening(tmp_path: Path, clock: FakeClock, ct: list[Path]) -> None:
    box = Outbox(tmp_path / "node", clock=clock, backoff_base=30, jitter=0)
    ids = [d.id for d in box.enqueue("pacs", ct)]
    box.mark_sent(ids[0])
    box.mark_failed(ids[1], "permanent", "rejected")
    box.mark_failed(ids[2], "transient", "down")
    before = box.list()
    box.close()
    box = Outbox(tmp_path / "node", clock=clock, backoff_base=30, jitter=0)
    try:
        assert box.list() == before
        assert [d.id for d in box.due("pacs")] == ids[3:]
        clock.advance(30)
        assert [d.id for d in box.due("pacs")] == [*ids[3:], ids[2]]
        assert box.enqueue("pacs", ct) == box.list()  # still idempotent
    finally:
        box.close()


def test_object_file_removed_once_every_destination_has_it(outbox: Outbox,
                                                           ct: list[Path]) -> None:
    (a,) = outbox.enqueue("pacs", ct[:1])
    (b,) = outbox.enqueue("viewer", ct[:1])
    outbox.mark_sent(a.id)
    assert a.path.exists()  # the viewer still needs it
    outbox.mark_sent(b.id)
    assert not a.path.exists()
    # enqueueing it for a new destination places it again
    (c,) = outbox.enqueue("archive", ct[:1])
    assert c.path.is_file()


def test_dispatcher_run_once_records_outcomes(outbox: Outbox, clock: FakeClock,
                                              ct: list[Path]) -> None:
    bad = ct[1].name

    def decide(p: Path) -> DeliveryOutcome:
        return (DeliveryOutcome.permanent(p, "status 0xA900") if p.name == f"{sop_uid(ct[1])}.dcm"
                else DeliveryOutcome.success(p))

    fake = FakeSender(decide)
    disp = Dispatcher(outbox, [dest()], "NODE", sender_factory=lambda d, ae: fake, batch_size=2)
    outbox.enqueue("pacs", ct)
    assert disp.drain("pacs") == 5
    assert [len(c) for c in fake.calls] == [2, 2, 1]
    counts = outbox.counts()
    assert counts[DeliveryState.SENT] == 4 and counts[DeliveryState.FAILED] == 1
    assert outbox.list("failed")[0].last_error == "status 0xA900", bad
    assert disp.run_once("pacs") == 0


def test_dispatcher_counts_a_crashing_sender_as_transient(outbox: Outbox, clock: FakeClock,
                                                          ct: list[Path]) -> None:
    class Broken(FakeSender):
        def send(self, files: list[Path]) -> list[DeliveryOutcome]:
            raise RuntimeError("bug")

    made: list[Sender] = []

    def factory(d: Destination, ae: str) -> Sender:
        made.append(Broken())
        return made[-1]

    disp = Dispatcher(outbox, [dest()], "NODE", sender_factory=factory)
    outbox.enqueue("pacs", ct[:2])
    assert disp.run_once("pacs") == 2
    assert all(d.state is DeliveryState.PENDING and d.attempts == 1
               and "sender error: bug" in (d.last_error or "") for d in outbox.list())
    clock.advance(10)
    disp.run_once("pacs")
    assert len(made) == 2  # a fresh sender after the failure


def test_one_destination_down_does_not_block_another(tmp_path: Path, ct: list[Path]) -> None:
    """A destination whose sends hang (or fail) delays only its own deliveries."""
    box = Outbox(tmp_path / "node", backoff_base=0.05, backoff_max=0.2)
    hang = threading.Event()
    release = threading.Event()

    def hanging(p: Path) -> DeliveryOutcome:
        hang.set()
        release.wait(20)
        return DeliveryOutcome.transient(p, "timed out")

    senders = {"down": FakeSender(hanging), "up": FakeSender(),
               "refusing": FakeSender(lambda p: DeliveryOutcome.transient(p, "refused"))}
    disp = Dispatcher(box, [dest("down"), dest("up"), dest("refusing")], "NODE",
                      sender_factory=lambda d, ae: senders[d.name], idle_wait=5)
    disp.start()
    try:
        box.enqueue("down", ct)
        assert hang.wait(10)
        box.enqueue("refusing", ct)
        box.enqueue("up", ct)  # wakes its thread: no waiting for idle_wait
        wait_until(lambda: box.counts("up")[DeliveryState.SENT] == 5, 5, "up delivered")
        assert box.counts("down")[DeliveryState.PENDING] == 5
        wait_until(lambda: senders["refusing"].sent >= 15, 10, "refusing retried")
    finally:
        release.set()
        assert disp.stop(timeout=10)
        box.close()


def test_dispatcher_wakes_on_enqueue_and_retry(tmp_path: Path, ct: list[Path]) -> None:
    box = Outbox(tmp_path / "node")
    fake = FakeSender(lambda p: DeliveryOutcome.permanent(p, "no"))
    disp = Dispatcher(box, [dest()], "NODE", sender_factory=lambda d, ae: fake, idle_wait=60)
    with disp:
        t0 = time.monotonic()
        box.enqueue("pacs", ct[:1])
        wait_until(lambda: box.counts()[DeliveryState.FAILED] == 1, 5, "first attempt")
        fake.decide = DeliveryOutcome.success
        box.retry()
        wait_until(lambda: box.counts()[DeliveryState.SENT] == 1, 5, "delivered after retry")
        assert time.monotonic() - t0 < 5
    box.close()


# -- the Sender contract, over every implementation, against a real peer ------------------

PROTOCOLS = ["dimse", "stowrs"]


def orthanc_destination(server: OrthancServer, protocol: str, name: str = "orthanc") -> Destination:
    if protocol == "stowrs":
        if not server.has_dicomweb:
            pytest.skip("the Orthanc DICOMweb plugin is not installed (orthanc-dicomweb)")
        return Destination(name=name, protocol="stowrs", url=server.dicomweb_url)
    return Destination(name=name, protocol="dimse", ae_title=server.ae_title,
                       host="127.0.0.1", port=server.dicom_port)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sender_contract(protocol: str, orthanc: OrthancServer,  # noqa: F811
                         ct: list[Path], tmp_path: Path) -> None:
    """One outcome per file, in order; bad files are permanent; a peer that is down
    makes everything transient; the sender can be used again after close()."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage" * 64)
    missing = tmp_path / "missing.dcm"
    sender = make_sender(orthanc_destination(orthanc, protocol), "DICOMNODE", timeout=10)
    try:
        outcomes = sender.send([ct[0], junk, ct[1], missing, ct[2]])
        assert [o.path for o in outcomes] == [ct[0], junk, ct[1], missing, ct[2]]
        assert [o.result for o in outcomes] == [Result.OK, Result.PERMANENT, Result.OK,
                                                Result.PERMANENT, Result.OK]
        assert all(o.reason for o in outcomes if not o.ok)
        assert all(orthanc.has(sop_uid(p)) for p in ct[:3])
        assert orthanc.count_instances() == 3
        assert sender.send([]) == []
        sender.close()
        orthanc.stop()
        down = sender.send(ct[3:])
        assert [o.result for o in down] == [Result.TRANSIENT, Result.TRANSIENT]
        assert all(o.reason for o in down)
        orthanc.start()
        assert all(o.ok for o in sender.send(ct[3:]))
        assert orthanc.count_instances() == 5
    finally:
        sender.close()


# -- delivery to Orthanc through the outbox -----------------------------------------------


def run_dispatcher(box: Outbox, destination: Destination) -> Dispatcher:
    disp = Dispatcher(box, [destination], "DICOMNODE", idle_wait=2,
                      sender_factory=lambda d, ae: make_sender(d, ae, timeout=10))
    disp.start()
    return disp


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_delivery_to_orthanc(protocol: str, orthanc: OrthancServer,  # noqa: F811
                             ct: list[Path], tmp_path: Path) -> None:
    destination = orthanc_destination(orthanc, protocol)
    box = Outbox(tmp_path / "node", backoff_base=0.2, backoff_max=1)
    disp = run_dispatcher(box, destination)
    try:
        box.enqueue(destination.name, ct, key="study-1")
        wait_until(lambda: box.counts()[DeliveryState.SENT] == 5, 30, "all sent")
    finally:
        assert disp.stop(10)
        box.close()
    for path in ct:
        (oid,) = orthanc.find(sop_uid(path))
        stored = pydicom.dcmread(io.BytesIO(orthanc.file(oid)))
        original = pydicom.dcmread(path)
        assert stored.PixelData == original.PixelData
    assert orthanc.count_instances() == 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_outage_retried_and_delivered_exactly_once(protocol: str,
                                                   orthanc: OrthancServer,  # noqa: F811
                                                   ct: list[Path], tmp_path: Path) -> None:
    destination = orthanc_destination(orthanc, protocol)
    orthanc.stop()
    box = Outbox(tmp_path / "node", backoff_base=0.2, backoff_max=0.5)
    disp = run_dispatcher(box, destination)
    try:
        box.enqueue(destination.name, ct)
        wait_until(lambda: all(d.attempts >= 2 for d in box.list()), 20, "retried while down")
        assert box.counts()[DeliveryState.PENDING] == 5
        assert all(d.last_result == "transient" for d in box.list())
        orthanc.start()
        wait_until(lambda: box.counts()[DeliveryState.SENT] == 5, 30, "delivered after outage")
    finally:
        assert disp.stop(10)
        box.close()
    assert orthanc.count_instances() == 5
    assert all(len(orthanc.find(sop_uid(p))) == 1 for p in ct)


def test_restarted_outbox_resumes_pending_deliveries(orthanc: OrthancServer,  # noqa: F811
                                                     ct: list[Path], tmp_path: Path) -> None:
    destination = orthanc_destination(orthanc, "dimse")
    orthanc.stop()
    box = Outbox(tmp_path / "node", backoff_base=0.2, backoff_max=0.5)
    disp = run_dispatcher(box, destination)
    box.enqueue(destination.name, ct)
    wait_until(lambda: all(d.attempts >= 1 for d in box.list()), 20, "tried while down")
    assert disp.stop(10)
    box.close()
    del box, disp

    orthanc.start()
    box = Outbox(tmp_path / "node", backoff_base=0.2, backoff_max=0.5)
    disp = run_dispatcher(box, destination)
    try:
        wait_until(lambda: box.counts()[DeliveryState.SENT] == 5, 30, "resumed and delivered")
        assert box.enqueue(destination.name, ct) == box.list()  # a re-run adds nothing
    finally:
        assert disp.stop(10)
        box.close()
    assert orthanc.count_instances() == 5
    assert not any((tmp_path / "node" / "outbox" / "objects").iterdir())


def test_stowrs_permanent_failures_are_recorded(orthanc: OrthancServer,  # noqa: F811
                                                ct: list[Path], tmp_path: Path) -> None:
    """A file whose data set is garbage and one Orthanc refuses (no Study Instance UID)
    fail permanently with a reason; their good neighbours in the batch are delivered."""
    destination = orthanc_destination(orthanc, "stowrs")
    garbage = tmp_path / "garbage.dcm"
    ds = pydicom.dcmread(ct[0])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.save_as(garbage)
    head = garbage.read_bytes()[: dataset_offset(garbage)]  # preamble + File Meta Information
    garbage.write_bytes(head + bytes(range(256)) * 8)
    no_study = tmp_path / "no-study.dcm"
    ds = pydicom.dcmread(ct[1])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.2"
    del ds.StudyInstanceUID
    ds.save_as(no_study)

    box = Outbox(tmp_path / "node", backoff_base=0.2, backoff_max=1)
    disp = run_dispatcher(box, destination)
    try:
        box.enqueue(destination.name, [ct[2], garbage, no_study, ct[3]])
        wait_until(lambda: box.counts()[DeliveryState.PENDING] == 0, 30, "all attempted")
    finally:
        assert disp.stop(10)
        box.close()
    box = Outbox(tmp_path / "node")
    try:
        by_sop: dict[str, Delivery] = {d.sop_instance_uid: d for d in box.list()}
    finally:
        box.close()
    assert by_sop[sop_uid(ct[2])].state is DeliveryState.SENT
    assert by_sop[sop_uid(ct[3])].state is DeliveryState.SENT
    for uid in ("1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"):
        d = by_sop[uid]
        assert d.state is DeliveryState.FAILED and d.last_result == "permanent", d
        assert d.last_error and d.attempts == 1
    assert "0xC000" in (by_sop["1.2.826.0.1.3680043.10.1.2"].last_error or "")
    assert orthanc.count_instances() == 2


def test_dimse_falls_back_to_implicit_vr_and_refuses_what_the_peer_cannot_take(
        tmp_path: Path, ct: list[Path]) -> None:
    """A peer that accepts only Implicit VR Little Endian (storescp +xi) gets the
    explicit-VR files converted; a file in a transfer syntax it refuses fails
    permanently without touching the others."""
    need_tool("storescp")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "IMPLICIT", "+xi", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    try:
        wait_until(lambda: echoscu(port, aec="IMPLICIT").returncode == 0, 10, "storescp up")
        jpeg = tmp_path / "jpeg.dcm"
        ds = pydicom.dcmread(ct[2])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG Lossless, SV1
        del ds.PixelData  # never sent: the peer refuses the context first
        ds.save_as(jpeg, enforce_file_format=False)
        sender = make_sender(dest("implicit", ae_title="IMPLICIT", port=port), "DICOMNODE",
                             timeout=10)
        outcomes = sender.send([ct[0], jpeg, ct[1]])
        assert [o.result for o in outcomes] == [Result.OK, Result.PERMANENT, Result.OK]
        assert "accepts no presentation context" in (outcomes[1].reason or "")
        received = sorted(out.iterdir())
        assert len(received) == 2
        for path in received:
            got = pydicom.dcmread(path)
            assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
            original = next(p for p in ct if sop_uid(p) == got.SOPInstanceUID)
            assert got.PixelData == pydicom.dcmread(original).PixelData
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
