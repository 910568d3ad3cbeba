"""The durable, lease-based job queue between routing and the workers.

:class:`JobQueue` is the contract (``base.py``); :class:`SQLiteJobQueue` the
single-machine back-end (``sqlite.py``); ``celery.py`` the back-end for workers on other
machines (records in SQLite, hand-offs through Celery on Redis). Both pass the same
contract test. ``celery.py`` is not imported here: it needs Celery only when chosen.
"""

from dicomnode.queue.base import (
    Job,
    JobQueue,
    JobState,
    JobStateError,
    LeaseLostError,
    Priority,
    QueueError,
    UnknownJobError,
    backoff_delay,
)
from dicomnode.queue.sqlite import SQLiteJobQueue

__all__ = [
    "Job",
    "JobQueue",
    "JobState",
    "JobStateError",
    "LeaseLostError",
    "Priority",
    "QueueError",
    "SQLiteJobQueue",
    "UnknownJobError",
    "backoff_delay",
]
