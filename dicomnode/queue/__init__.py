"""The durable, lease-based job queue between routing and the workers.

:class:`JobQueue` is the contract (``base.py``); :class:`SQLiteJobQueue` the
single-machine back-end (``sqlite.py``). A distributed back-end (Celery on Redis)
will sit beside it and pass the same contract test.
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
