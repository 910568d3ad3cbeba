"""How a job's inference runs: the hooks a runtime offers its scheduler.

A runtime does not know about queues, priorities or GPU memory. The worker's scheduler
(:mod:`dicomnode.worker.gpu`) runs ``runtime.predict(volume)`` inside an
:class:`Execution` (a context variable of the calling thread), and the torch runtimes
route their network through three small hooks, which are no-ops when nothing is
scheduling them (a test calling ``predict`` directly):

* :func:`guard` wraps the network handed to MONAI's ``sliding_window_inference`` (or
  an inferer): before each batch of windows it calls :meth:`Execution.checkpoint`, where
  a routine job waits while a STAT job runs (preemption between window batches; the
  windows already computed stay where they are and the job resumes where it stopped);
* :func:`window_batch` lets the scheduler lower the sliding-window batch size (after an
  out-of-memory error it halves it and runs the job again) and records the size used;
* :func:`run_inferer` applies both to a MONAI inferer object (``SlidingWindowInferer``
  keeps its batch size as an attribute; a copy gets the lowered one).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_CURRENT: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "dicomnode_execution", default=None)


@dataclass
class Execution:
    """One run of one job's model: what the scheduler asks of it, what it did."""

    #: at most this many windows per network call (None: the runtime's own choice)
    sw_batch_size: int | None = None
    #: called before every network call of a sliding window (may block: preemption)
    checkpoint: Callable[[], None] = field(default=lambda: None)
    #: the batch size the runtime asked for (before any lowering), per inferer call
    asked_batch: int | None = None
    #: the batch size used
    used_batch: int | None = None
    #: network calls made (window batches, or 1 for a whole-volume network)
    calls: int = 0


def current() -> Execution | None:
    """The :class:`Execution` of the calling thread's job, if it is scheduled."""
    return _CURRENT.get()


@contextlib.contextmanager
def running(execution: Execution) -> Iterator[Execution]:
    """Make ``execution`` current in this thread for the duration."""
    token = _CURRENT.set(execution)
    try:
        yield execution
    finally:
        _CURRENT.reset(token)


def window_batch(default: int) -> int:
    """The sliding-window batch size to use where the runtime would use ``default``."""
    ex = current()
    if ex is None:
        return default
    ex.asked_batch = default
    ex.used_batch = min(default, ex.sw_batch_size) if ex.sw_batch_size else default
    return ex.used_batch


def guard(network: Callable[..., Any]) -> Callable[..., Any]:
    """``network`` behind the current execution's checkpoint (itself if none)."""
    ex = current()
    if ex is None:
        return network

    def guarded(*args: Any, **kwargs: Any) -> Any:
        ex.checkpoint()
        ex.calls += 1
        return network(*args, **kwargs)

    return guarded


def run_inferer(inferer: Callable[..., Any], inputs: Any, network: Callable[..., Any]) -> Any:
    """``inferer(inputs, network)`` with the batch size and checkpoint of the current
    execution (a MONAI ``Inferer``: ``SlidingWindowInferer`` or ``SimpleInferer``)."""
    ex = current()
    if ex is None:
        return inferer(inputs, network)
    batch = getattr(inferer, "sw_batch_size", None)
    if isinstance(batch, int) and not isinstance(batch, bool):
        lowered = window_batch(batch)
        if lowered != batch:
            inferer = copy.copy(inferer)
            inferer.sw_batch_size = lowered  # type: ignore[attr-defined]
    return inferer(inputs, guard(network))
