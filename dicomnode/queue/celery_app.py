"""Celery on Redis for dicomnode: the app, the transport, the names on the broker.

Shared by the node (which publishes) and ``dicomnode worker`` (which consumes): the queue
of a model, the message priorities (kombu keeps one Redis list per priority step, and
every consumer serves the STAT list first), the transport options (the lists' names depend
on them, so both sides must agree) and :func:`make_celery_app` with dicomnode's delivery
semantics (late acknowledgement, reject on worker lost, prefetch one, a visibility
timeout longer than the worst job, no result backend). :func:`redis_transport` is kombu's
Redis transport with acknowledgements that survive a broker outage.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dicomnode.queue.base import Priority, check_text

logger = logging.getLogger(__name__)

TASK_NAME = "dicomnode.run_job"
QUEUE_PREFIX = "dicomnode."
#: Redis message priorities (lower is served first) and the lists kombu keeps for them.
PRIORITY_STEPS = (0, 9)
_CELERY_PRIORITY = {Priority.STAT: 0, Priority.ROUTINE: 9}
#: kombu's Redis transport: priority list separator, unacked hash and its time index.
_SEP = "\x06\x16"
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"
_TASK_ID = re.compile(r"^dicomnode-job-([0-9]+)-([0-9]+)$")


def queue_name(model: str) -> str:
    """The broker queue of ``model``'s jobs (workers holding the model consume it)."""
    return QUEUE_PREFIX + check_text("model", model)


def celery_priority(priority: Priority | int | str) -> int:
    """The Redis message priority of a job priority (0: STAT, served first; 9: ROUTINE)."""
    return _CELERY_PRIORITY[Priority.parse(priority)]


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def transport_options(visibility_timeout: float, *, connect_timeout: float = 5.0) -> dict[str, Any]:
    """kombu's Redis transport options, the same on the node and on every worker (the
    priority lists' names depend on them)."""
    return {
        "visibility_timeout": float(visibility_timeout),
        "queue_order_strategy": "priority",  # a worker serves its queues in configured order
        "priority_steps": list(PRIORITY_STEPS),
        "sep": _SEP,
        "socket_connect_timeout": float(connect_timeout),
        "socket_timeout": 30.0,
        "health_check_interval": 10,
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
    }


#: How long an acknowledgement waits for Redis to come back before it is given up.
ACK_RETRY_SECONDS = 60.0
_TRANSPORT: Any = None


def redis_transport() -> Any:
    """kombu's Redis transport, with acknowledgements that survive a broker outage.

    kombu's ``QoS.ack`` raises when Redis is unreachable *before* it forgets the delivery,
    so a worker with a prefetch of one then waits forever for a slot that never frees up
    (it never asks Redis for a message again, even once Redis is back). Here an ack (or a
    reject) is retried until Redis answers, for at most :data:`ACK_RETRY_SECONDS`, and the
    delivery is forgotten locally whatever happens. An ack that never reached Redis leaves
    the message in its unacked set: it comes back after the visibility timeout, and the
    node answers the claim with "already done", so the worker drops it.
    """
    global _TRANSPORT
    if _TRANSPORT is not None:
        return _TRANSPORT
    from kombu.transport import redis as kredis
    from kombu.transport import virtual

    def settle(qos: Any, what: str, tag: Any, step: Callable[[], Any]) -> None:
        deadline = time.monotonic() + ACK_RETRY_SECONDS
        warned = False
        while True:
            try:
                step()
                break
            except qos.channel.connection_errors as exc:
                if time.monotonic() > deadline:
                    logger.error("broker unreachable: %s of message %s given up (%s); it comes"
                                 " back after the visibility timeout and is dropped then",
                                 what, tag, exc)
                    break
                if not warned:
                    logger.warning("broker unreachable: %s of message %s retried until it is"
                                   " back (%s)", what, tag, exc)
                    warned = True
                time.sleep(1.0)
        virtual.QoS.ack(qos, tag)  # forget the delivery: the prefetch slot is free again

    class QoS(kredis.QoS):
        def ack(self, delivery_tag: Any) -> None:
            settle(self, "acknowledgement", delivery_tag,
                   lambda: self._remove_from_indices(delivery_tag).execute())

        def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
            if requeue:
                settle(self, "requeue", delivery_tag,
                       lambda: self.restore_by_tag(delivery_tag, leftmost=True))
            else:
                self.ack(delivery_tag)

    class Channel(kredis.Channel):
        pass

    Channel.QoS = QoS

    class Transport(kredis.Transport):
        pass

    Transport.Channel = Channel
    _TRANSPORT = Transport
    return Transport


def make_celery_app(url: str, *, visibility_timeout: float, main: str = "dicomnode",
                    connect_timeout: float = 5.0, publisher: bool = False) -> Any:
    """A Celery app on the Redis broker ``url`` with dicomnode's delivery semantics.

    No result backend (results go to the node over HTTP). Nothing connects here.
    ``publisher``: the node's side, which must not wait for a broker that is down (its
    hand-offs wait in SQLite instead): one connection attempt per publish.
    """
    from celery import Celery

    options = transport_options(visibility_timeout, connect_timeout=connect_timeout)
    if publisher:
        options["max_retries"] = 0

    app = Celery(main, broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged when the job has ended, not when received
        task_reject_on_worker_lost=True,  # a killed pool child puts its message back
        worker_prefetch_multiplier=1,  # a long job holds no other message back
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_priority=_CELERY_PRIORITY[Priority.ROUTINE],
        task_create_missing_queues=True,
        broker_transport_options=options,
        broker_connection_timeout=connect_timeout,
        broker_transport=redis_transport(),
        # the node decides whether a job runs again (leases), not the connection's fate
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for its broker, forever
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app
