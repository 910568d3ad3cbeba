"""The job queue contract: durable jobs handed out under leases.

Modelled on APScheduler 4's data store (``acquire_jobs`` / ``release_job`` /
``reap_abandoned_jobs``): a worker *acquires* jobs, which marks them LEASED to it
until ``lease_expires``; it may *extend* the lease while it works, and *releases*
the job with a result (DONE) or an error (back to PENDING after a backoff, or
FAILED once ``max_attempts`` are spent). A worker that dies leaves its leases to
expire; :meth:`JobQueue.reap_abandoned`, called at start-up and periodically,
puts those jobs back. One enum of states, no marker files.

Every back-end (SQLite, Celery on Redis) implements :class:`JobQueue` and passes the
same contract test, ``tests/test_queue_contract.py``.

Time comes from an injected ``clock`` (seconds since the epoch, default
:func:`time.time`) so that tests move time instead of sleeping.
"""

from __future__ import annotations

import abc
import builtins
import enum
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_BASE = 30.0
DEFAULT_BACKOFF_MAX = 3600.0
DEFAULT_BACKOFF_JITTER = 0.25

Clock = Callable[[], float]


# -- errors -------------------------------------------------------------------


class QueueError(DicomNodeError):
    """Base class of the job queue's errors."""


class UnknownJobError(QueueError, KeyError):
    """No job has the given id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class LeaseLostError(QueueError):
    """The caller does not hold the lease on the job (any more).

    Raised by :meth:`JobQueue.release` when the job is not LEASED to ``owner``:
    its lease expired and was reaped (perhaps taken by another owner since), or
    the job was already released. The caller's result must be discarded.
    """

    def __init__(self, job_id: int, owner: str, state: JobState, holder: str | None) -> None:
        self.job_id = job_id
        self.owner = owner
        self.state = state
        self.holder = holder
        held = f"leased to {holder!r}" if state is JobState.LEASED else state.value
        super().__init__(f"job {job_id}: lease not held by {owner!r} (job is {held})")


class JobStateError(QueueError):
    """The job is not in a state that allows the operation (e.g. retry of a DONE job)."""


# -- values -------------------------------------------------------------------


class JobState(enum.Enum):
    """The one set of states a job goes through.

    PENDING -> LEASED -> DONE, or back to PENDING (error with attempts left, or
    lease expired and reaped), or FAILED (attempts spent); FAILED -> PENDING by
    an explicit :meth:`JobQueue.retry`.
    """

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"

    @classmethod
    def parse(cls, value: JobState | str) -> JobState:
        """Normalise a state or its name/value (any case); raise ValueError otherwise."""
        if isinstance(value, JobState):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(f"state: {value!r} is not one of {[s.value for s in cls]}")


class Priority(enum.IntEnum):
    """Job priority: lower runs first (STAT before ROUTINE)."""

    STAT = 0
    ROUTINE = 1

    @classmethod
    def parse(cls, value: Priority | int | str) -> Priority:
        """Normalise a priority, its integer value or its name (any case)."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"priority: {value!r} is not one of {[p.name for p in cls]}")


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job as the queue held it when it was read.

    ``key`` is the idempotency key (e.g. ``"<study uid>/<revision>/<model>"``):
    adding a job whose key exists returns the existing job. ``attempts`` counts
    acquisitions (an attempt is counted when the job is leased). ``not_before``
    is the earliest time it may be acquired. ``payload`` and ``result`` are
    JSON-able dicts (copies: changing them changes nothing in the queue).
    """

    id: int
    key: str
    model: str
    payload: dict[str, Any]
    priority: Priority
    state: JobState
    attempts: int
    max_attempts: int
    not_before: float
    lease_owner: str | None
    lease_expires: float | None
    created_at: float
    updated_at: float
    last_error: str | None
    result: dict[str, Any] | None


# -- backoff ------------------------------------------------------------------


def backoff_delay(
    attempts: int, *, base: float, ceiling: float, jitter: float, rng: random.Random
) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones.

    Exponential (``base * 2**(attempts-1)``) capped at ``ceiling``, then reduced
    by a random fraction of at most ``jitter`` so that jobs failing together do
    not come back together: the delay lies in ``[d * (1 - jitter), d]``, never
    above the ceiling.
    """
    exponent = max(attempts, 1) - 1
    # 2**exponent overflows float for absurd attempt counts; the ceiling wins anyway.
    nominal = ceiling if exponent >= 1024 else min(ceiling, base * math.pow(2.0, exponent))
    return nominal * (1.0 - jitter * rng.random())


def error_text(error: BaseException | str) -> str:
    """How an error is stored in ``last_error``: the message, with the type for exceptions."""
    if isinstance(error, BaseException):
        message = str(error)
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return str(error)


def to_json(value: Mapping[str, Any] | None, name: str) -> str | None:
    """Serialise a payload or result, raising ValueError naming ``name`` if it is not JSON-able."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: must be a JSON-able dict, not {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not JSON-able ({exc})") from exc


# -- the contract -------------------------------------------------------------


class JobQueue(abc.ABC):
    """A durable, lease-based job queue shared by the node's processes and threads.

    Implementations must make :meth:`acquire` atomic (no job handed to two owners,
    across threads and processes) and keep every committed change across a crash.
    An owner string identifies one live worker (e.g. ``"host:pid:uuid"``); it must
    not be shared by two live workers.

    A lease is held while the job is LEASED to its owner: a lease past its expiry
    that nobody has reaped yet can still be extended or released; once
    :meth:`reap_abandoned` took the job back, it is lost (:class:`LeaseLostError`).
    """

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        if not callable(clock):
            raise ValueError("clock: must be a callable returning seconds since the epoch")
        _check_positive("backoff_base", backoff_base)
        _check_positive("backoff_max", backoff_max)
        if backoff_max < backoff_base:
            raise ValueError(f"backoff_max: {backoff_max} is below backoff_base ({backoff_base})")
        if not isinstance(backoff_jitter, int | float) or not 0.0 <= backoff_jitter <= 1.0:
            raise ValueError(f"backoff_jitter: {backoff_jitter!r} is not within [0, 1]")
        self._clock = clock
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.backoff_jitter = float(backoff_jitter)
        self._rng = rng if rng is not None else random.Random()

    # -- helpers for implementations -----------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    def _backoff(self, attempts: int) -> float:
        """The delay before the next attempt after ``attempts`` (see :func:`backoff_delay`)."""
        return backoff_delay(
            attempts,
            base=self.backoff_base,
            ceiling=self.backoff_max,
            jitter=self.backoff_jitter,
            rng=self._rng,
        )

    # -- the contract ---------------------------------------------------------

    @abc.abstractmethod
    def add(
        self,
        key: str,
        model: str,
        payload: Mapping[str, Any],
        *,
        priority: Priority | int | str = Priority.ROUTINE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Job:
        """Add a PENDING job runnable now; idempotent on ``key``.

        If a job with ``key`` exists (in any state), it is returned unchanged and
        nothing is added, whatever the other arguments say.
        """

    @abc.abstractmethod
    def acquire(self, owner: str, lease_seconds: float, limit: int = 1,
                max_priority: Priority | int | str | None = None) -> builtins.list[Job]:
        """Lease up to ``limit`` runnable jobs to ``owner`` for ``lease_seconds``.

        Runnable: PENDING with ``not_before <= now`` and, when ``max_priority`` is
        given, a priority at least that urgent (``Priority.STAT``: STAT jobs only, for
        a worker slot kept free for them). Order: priority (STAT first), then oldest
        ``created_at``, then id. Each job becomes LEASED with ``lease_owner``,
        ``lease_expires = now + lease_seconds`` and ``attempts + 1``, atomically: no
        job is handed to two owners.
        """

    @abc.abstractmethod
    def extend(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Push the lease's expiry to ``now + lease_seconds``; False if ``owner`` lost it."""

    @abc.abstractmethod
    def release(
        self,
        job_id: int,
        owner: str,
        result: Mapping[str, Any] | None = None,
        error: BaseException | str | None = None,
    ) -> Job:
        """End ``owner``'s lease with a result or an error; return the job as it is now.

        Without ``error``: DONE with ``result``. With ``error``: ``last_error`` is
        kept and the job goes back to PENDING with ``not_before = now + backoff``
        if ``attempts < max_attempts``, else to FAILED.

        Raises :class:`LeaseLostError` if the job is not LEASED to ``owner``,
        :class:`UnknownJobError` if there is no such job, ValueError if both
        ``result`` and ``error`` are given.
        """

    @abc.abstractmethod
    def reap_abandoned(self, now: float | None = None) -> int:
        """Take back every LEASED job whose lease expired at ``now`` (default: the clock).

        The attempt was already counted at acquisition: the job goes back to
        PENDING, runnable at once, or to FAILED with ``last_error = "lease expired
        N times"`` if ``attempts >= max_attempts``. Returns how many were taken
        back. Call at start-up and periodically.
        """

    @abc.abstractmethod
    def get(self, job_id: int) -> Job | None:
        """The job with ``job_id``, or None."""

    @abc.abstractmethod
    def list(self, states: Iterable[JobState | str] | None = None) -> builtins.list[Job]:
        """Every job (in ``states`` if given), by id."""

    @abc.abstractmethod
    def recent(self, limit: int, states: Iterable[JobState | str] | None = None
               ) -> builtins.list[Job]:
        """The ``limit`` newest jobs (in ``states`` if given), newest first: what a page
        shows, without reading every job the node ever ran."""

    @abc.abstractmethod
    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zeros included)."""

    @abc.abstractmethod
    def oldest_pending_age(self) -> float | None:
        """Seconds the longest-waiting PENDING job has been runnable.

        Measured from its ``not_before`` (its creation, or the end of its last
        backoff): 0.0 when every PENDING job is still backing off, None when no
        job is PENDING. A growing value means the workers do not keep up.
        """

    @abc.abstractmethod
    def retry(self, job_id: int) -> Job:
        """Put a FAILED job back to PENDING, runnable now, with ``attempts`` reset to 0.

        Raises :class:`JobStateError` if it is not FAILED, :class:`UnknownJobError`
        if there is no such job.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the back-end's resources; the queue is not usable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- argument checks shared by implementations ---------------------------------


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name}: must be a positive number of seconds, not {value!r}")
    return float(value)


def check_lease_seconds(lease_seconds: object) -> float:
    """Validate a lease duration (positive, finite)."""
    return _check_positive("lease_seconds", lease_seconds)


def check_text(name: str, value: object) -> str:
    """Validate a non-empty string argument (key, model, owner)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, not {value!r}")
    return value


def check_count(name: str, value: object) -> int:
    """Validate a positive integer argument (limit, max_attempts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, not {value!r}")
    return value


def parse_states(states: Iterable[JobState | str] | None) -> builtins.list[JobState] | None:
    """Normalise an optional collection of states (a single state or string is accepted too)."""
    if states is None:
        return None
    if isinstance(states, JobState | str):
        return [JobState.parse(states)]
    return [JobState.parse(s) for s in states]
