"""Where jobs wait (``queue:``) and what a remote worker needs (``worker:``): Celery on
Redis for ``dicomnode worker`` processes on other machines (issue 12)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator

from dicomnode.config.base import Model
from dicomnode.config.http import HttpToken


def _check_redis_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^rediss?://[^/\s]+(/[0-9]{1,2})?$", value):
        raise ValueError("must be redis://HOST:PORT/N or rediss://HOST:PORT/N")
    return value


class QueueConfig(Model):
    """Where jobs wait: SQLite in the node (one machine), or Celery on Redis for workers on
    other machines (``dicomnode worker``). The job records stay in the node's SQLite either
    way; Redis only carries the hand-offs to the workers (see dicomnode/queue/celery.py)."""

    backend: Literal["sqlite", "celery"] = "sqlite"
    url: Annotated[str, AfterValidator(_check_redis_url)] | None = Field(
        default=None, description="the Redis broker, redis://HOST:PORT/N (backend celery)")
    visibility_timeout_seconds: float = Field(
        default=7200.0, ge=10,
        description="an unacknowledged message goes back to the queue after this long: longer"
        " than the slowest job, so that a running job is never handed out twice")
    worker_tokens: tuple[HttpToken, ...] = Field(
        default=(), description="bearer tokens (SHA-256) that workers present to the node's"
        " worker API; a DICOMweb token is not one")

    @model_validator(mode="after")
    def _url_for_celery(self) -> QueueConfig:
        if self.backend == "celery" and self.url is None:
            raise ValueError("a celery queue needs url: redis://HOST:PORT/N")
        return self


class WorkerConfig(Model):
    """``dicomnode worker``: a process, perhaps on another machine, that runs models for a
    node. It needs only the broker (queue.url), the node's HTTP address and a worker token."""

    node_url: str | None = Field(
        default=None, pattern=r"^https?://[^/\s]+/?$", description="e.g. http://node:8080")
    token: SecretStr | None = Field(default=None, description="the worker token (plain text)")
    token_file: Path | None = Field(
        default=None, description="or a file holding it (e.g. a container secret), read at start")
    ca_file: Path | None = Field(default=None, description="CA of the node's HTTPS certificate")
    name: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$",
                             description="default: <host>-<storage folder name>")
    models: tuple[str, ...] = Field(
        default=(), description="models (= queues) this worker takes; default: every model"
        " folder in models_dir")
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=300)
    node_retry_seconds: float = Field(
        default=900.0, gt=0, description="how long a result upload (or a claim) is retried"
        " while the node does not answer")
    input_codec: Literal["raw", "deflate"] = Field(
        default="raw", description="deflate halves the transfer on a slow network")
