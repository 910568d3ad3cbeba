"""The dispatcher: sends the outbox's due deliveries, one thread per destination,
so that one destination that is down does not hold up the others."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from dicomnode.audit.recorder import Audit, NullAudit
from dicomnode.config import Destination
from dicomnode.export.base import DeliveryOutcome, Result, Sender
from dicomnode.export.deliveries import DEFAULT_BATCH_SIZE, Delivery, DeliveryState
from dicomnode.export.outbox import Outbox
from dicomnode.export.senders import make_sender

LOG = logging.getLogger(__name__)

DEFAULT_IDLE_WAIT = 30.0
SenderFactory = Callable[[Destination, str], Sender]


class Dispatcher:
    """Sends the outbox's due deliveries: one thread per destination.

    ``destinations`` are the configured ones (deliveries for a name not among them
    stay pending, with a warning). ``sender_factory(destination, calling_ae)`` builds
    each destination's sender (default :func:`~dicomnode.export.senders.make_sender`).
    Each thread takes up to ``batch_size`` due deliveries at a time, sends them,
    records the outcomes, and sleeps until the next is due -- at most ``idle_wait``
    seconds, and less when something is enqueued or retried (:meth:`wake`).

    :meth:`run_once` does one batch for one destination in the calling thread
    (no threads, no sleeping: for tests and for a ``dicomnode outbox --flush``).
    """

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        calling_ae: str,
        *,
        sender_factory: SenderFactory = make_sender,
        batch_size: int = DEFAULT_BATCH_SIZE,
        idle_wait: float = DEFAULT_IDLE_WAIT,
        audit: Audit | None = None,
        on_delivered: Callable[[str, str], None] | None = None,
        after_batch: Callable[[str], None] | None = None,
    ) -> None:
        self.audit: Audit = audit or NullAudit()
        # called once per (job key, destination) with the first object delivered
        self._on_delivered = on_delivered
        self._delivered: set[tuple[str, str]] = set()
        # called with the destination after each batch sent to it (e.g. to release the
        # rejection notes that wait for the results just delivered: dicomnode.withdrawal)
        self._after_batch = after_batch
        if not isinstance(outbox, Outbox):
            raise TypeError(f"outbox: must be an Outbox, not {type(outbox).__name__}")
        names = [d.name for d in destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: duplicate names in {names}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, not {batch_size!r}")
        if not idle_wait > 0:
            raise ValueError(f"idle_wait: must be positive, not {idle_wait!r}")
        self.outbox = outbox
        self.destinations = {d.name: d for d in destinations}
        self.calling_ae = calling_ae
        self.sender_factory = sender_factory
        self.batch_size = int(batch_size)
        self.idle_wait = float(idle_wait)
        self._senders: dict[str, Sender] = {}
        self._senders_lock = threading.Lock()
        self._events = {name: threading.Event() for name in self.destinations}
        self._stopping = threading.Event()
        self._threads: dict[str, threading.Thread] = {}

    # -- one batch -------------------------------------------------------------------------

    def _sender(self, name: str) -> Sender:
        with self._senders_lock:
            sender = self._senders.get(name)
            if sender is None:
                sender = self.sender_factory(self.destinations[name], self.calling_ae)
                self._senders[name] = sender
            return sender

    def _drop_sender(self, name: str) -> None:
        with self._senders_lock:
            sender = self._senders.pop(name, None)
        if sender is not None:
            try:
                sender.close()
            except Exception:
                LOG.warning("closing the sender for %s failed", name, exc_info=True)

    def run_once(self, destination: str) -> int:
        """Send one batch of due deliveries to ``destination``; returns how many were tried."""
        if destination not in self.destinations:
            raise ValueError(f"destination: {destination!r} is not configured")
        batch = self.outbox.due(destination, self.batch_size)
        if not batch:
            return 0
        files = [d.path for d in batch]
        try:
            sender = self._sender(destination)
            outcomes = sender.send(files)
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"{sender!r} returned {len(outcomes)} outcomes for {len(batch)} files"
                )
        except Exception as exc:
            LOG.exception("sending %d object(s) to %s failed", len(batch), destination)
            self._drop_sender(destination)
            outcomes = [DeliveryOutcome.transient(f, f"sender error: {exc}") for f in files]
        updated = self.outbox.record(zip((d.id for d in batch), outcomes, strict=True))
        self._audit(destination, batch, outcomes, updated)
        if self._on_delivered is not None:
            for d, o in zip(batch, outcomes, strict=True):
                if o.ok and (d.key, destination) not in self._delivered:
                    self._delivered.add((d.key, destination))
                    try:
                        self._on_delivered(d.key, destination)
                    except Exception:
                        LOG.exception("delivery callback failed")
        ok = sum(1 for o in outcomes if o.ok)
        if ok and self._after_batch is not None:
            try:
                self._after_batch(destination)
            except Exception:
                LOG.exception("after-batch callback failed for %s", destination)
        if ok:
            LOG.info("outbox: %d of %d object(s) delivered to %s", ok, len(batch), destination)
        if outcomes and all(o.result is Result.TRANSIENT for o in outcomes):
            self._drop_sender(destination)  # reconnect from scratch next time
        return len(batch)

    def _audit(self, destination: str, batch: Sequence[Delivery],
               outcomes: Sequence[DeliveryOutcome], updated: Sequence[Delivery]) -> None:
        """One audit event per study and outcome: sent, or given up (transient failures
        that will be retried are not audited, only logged)."""
        from dicomnode.audit import events

        dest = self.destinations[destination]
        address = dest.url or f"{dest.ae_title}@{dest.host}:{dest.port}"
        gave_up = {d.id for d in updated if d.state is DeliveryState.FAILED}
        groups: dict[tuple[str, bool], dict[str, int]] = {}
        reasons: dict[str, str] = {}
        for d, o in zip(batch, outcomes, strict=True):
            if not o.ok and d.id not in gave_up:
                continue
            study = d.key.split("/", 1)[0]
            counts = groups.setdefault((study, o.ok), {})
            counts[d.sop_class_uid] = counts.get(d.sop_class_uid, 0) + 1
            if not o.ok:
                reasons[study] = o.reason or "failed"
        for (study, ok), classes in groups.items():
            self.audit.record(events.result_sent, destination, address, study, classes, ok,
                                                 reason=None if ok else reasons.get(study))

    def drain(self, destination: str, max_batches: int = 1000) -> int:
        """:meth:`run_once` until nothing is due (or ``max_batches``); returns how many tried."""
        total = 0
        for _ in range(max_batches):
            n = self.run_once(destination)
            if not n:
                break
            total += n
        return total

    # -- threads -----------------------------------------------------------------------------

    def wake(self, destination: str | None = None) -> None:
        """Make the thread of ``destination`` (or every thread) look for due deliveries now."""
        if destination is None:
            for event in self._events.values():
                event.set()
        elif destination in self._events:
            self._events[destination].set()

    def start(self) -> None:
        """Start one thread per destination (and listen to the outbox to wake them)."""
        if self._threads:
            raise RuntimeError("dispatcher already started")
        self._stopping.clear()
        for name, counts in self.outbox.summary().items():
            if name not in self.destinations and counts[DeliveryState.PENDING]:
                LOG.warning(
                    "outbox: %d pending deliveries for %r, which is not a configured"
                    " destination: they wait until it is", counts[DeliveryState.PENDING], name,
                )
        self.outbox.add_listener(self.wake)
        for name in self.destinations:
            thread = threading.Thread(
                target=self._loop, args=(name,), name=f"outbox-{name}", daemon=True
            )
            self._threads[name] = thread
            thread.start()
        LOG.info("outbox dispatcher started for %d destination(s)", len(self._threads))

    def _loop(self, name: str) -> None:
        event = self._events[name]
        failures = 0
        try:
            while not self._stopping.is_set():
                event.clear()
                try:
                    tried = self.run_once(name)
                    failures = 0
                except Exception:  # the database, not the peer: wait a little, go on
                    failures += 1
                    LOG.exception("outbox dispatcher for %s: unexpected error", name)
                    event.wait(min(self.idle_wait, 0.5 * 2 ** min(failures, 6)))
                    continue
                if tried:
                    continue
                next_due = self.outbox.next_due(name)
                delay = self.idle_wait
                if next_due is not None:
                    delay = min(delay, max(0.0, next_due - self.outbox.clock()))
                event.wait(max(delay, 0.01))
        finally:
            self._drop_sender(name)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the threads (a send in progress finishes, within its own timeouts);
        True when all stopped within ``timeout`` seconds."""
        self._stopping.set()
        self.outbox.remove_listener(self.wake)
        self.wake()
        deadline = time.monotonic() + timeout
        stopped = True
        for name, thread in self._threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                LOG.warning("outbox dispatcher thread for %s did not stop in time", name)
                stopped = False
        self._threads.clear()
        for name in list(self._senders):
            self._drop_sender(name)
        return stopped

    def __enter__(self) -> Dispatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
