"""``dicomnode worker``: run models for a node, from another machine if need be.

A worker needs three things: the broker (``queue.url``), the node's HTTP address and a
worker token (``worker.node_url``, ``worker.token``). It shares no file system with the
node; ``--storage`` is its own folder (identity, lock, results waiting for upload).

It is a Celery worker (solo pool: one job at a time in this process, so that the models
stay warm in it; prefetch one, late acknowledgement) consuming the queues of the models it
holds (``dicomnode.<model>``, STAT messages first). For each message ``(job id, model)``:

1. **claim** the job from the node (409/404/410: the message is stale or the job is over:
   it is acknowledged and dropped; the node not answering: retried, then the message is
   put back);
2. **fetch** the de-identified volume (voxels, geometry, opaque slice keys, declared
   attributes) and extend the lease every third of it while the model runs;
3. **predict** with the model, loaded once at start-up (``ModelPool``);
4. **hand back** the label map, measurements and model identity (spooled in ``--storage``
   first, then uploaded, retried for ``worker.node_retry_seconds`` while the node is away,
   e.g. restarting). A model error is reported instead (``/fail``): the node backs off or
   fails the job as it does for its own worker.

A heartbeat (name, host, models, state, current job) goes to the node every
``worker.heartbeat_seconds``. A wrong token stops the worker at start with a message
that says so (exit status 2).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dicomnode import __version__
from dicomnode.config import NodeConfig
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.queue.celery_app import TASK_NAME, make_celery_app, queue_name, redact_url
from dicomnode.worker import wire

LOG = logging.getLogger(__name__)

API = "/workers/v1"
SPOOL = "results"
IDENTITY = "worker.json"
LOCK = "worker.lock"
T = TypeVar("T")


class TokenRefused(DicomNodeError):
    """The node refused this worker's token."""


class NodeUnavailable(DicomNodeError):
    """The node did not answer within the retry window."""


class NodeAnswer(DicomNodeError):
    """The node answered a request with an error status (its reason in the message)."""

    def __init__(self, status: int, reason: str, state: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason
        self.state = state


_RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)


class NodeClient:
    """The node's worker API over HTTP(S) (``requests``), with this worker's identity."""

    def __init__(self, base_url: str, token: str, owner: str, worker: str, *,
                 ca_file: Path | None = None, retry_seconds: float = 900.0,
                 timeout: tuple[float, float] = (5.0, 120.0)) -> None:
        import requests

        self.base = base_url.rstrip("/") + API
        self.retry_seconds = float(retry_seconds)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({
            "Authorization": f"Bearer {token}",
            "X-Dicomnode-Owner": owner,
            "X-Dicomnode-Worker": worker,
            "User-Agent": f"dicomnode-worker/{__version__}",
        })
        if ca_file is not None:
            self.session.verify = str(ca_file)

    def _answer(self, resp: Any) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:500]}
        if resp.status_code == 401:
            raise TokenRefused(f"the node at {self.base} refused this worker's token:"
                               f" {body.get('error', 'unauthorized')}")
        if resp.status_code >= 400:
            raise NodeAnswer(resp.status_code, str(body.get("error", resp.reason)),
                             body.get("state"))
        return dict(body)

    def _retrying(self, what: str, call: Callable[[], T], *, once: bool = False) -> T:
        """``call()`` until it answers, retrying connection errors and 5xx/429 for
        ``retry_seconds`` (``once``: no retry)."""
        import requests

        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except NodeAnswer as exc:
                if once or exc.status not in _RETRY_STATUS:
                    raise
                problem = str(exc)
            except (requests.RequestException, wire.WireError) as exc:
                # no answer, or a transfer cut or damaged on the way (checked by the format)
                if once:
                    raise NodeUnavailable(f"{what}: the node does not answer ({exc})") from None
                problem = f"{type(exc).__name__}: {exc}"[:300]
            if time.monotonic() + delay > deadline:
                raise NodeUnavailable(f"{what}: the node did not answer for"
                                      f" {self.retry_seconds:.0f} s ({problem})")
            LOG.warning("%s: %s; retrying in %.1f s", what, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.session.post(self.base + path, json=body or {}, timeout=self.timeout)
        return self._answer(resp)

    def heartbeat(self, beat: dict[str, Any]) -> dict[str, Any]:
        return self._retrying("heartbeat", lambda: self._post("/heartbeat", beat), once=True)

    def claim(self, job_id: int) -> dict[str, Any]:
        return self._retrying(f"job {job_id}: claim", lambda: self._post(f"/jobs/{job_id}/claim"))

    def extend(self, job_id: int) -> dict[str, Any]:
        return self._retrying(f"job {job_id}: lease", lambda: self._post(f"/jobs/{job_id}/extend"),
                              once=True)

    def fail(self, job_id: int, error: str) -> dict[str, Any]:
        return self._retrying(f"job {job_id}: report failure",
                              lambda: self._post(f"/jobs/{job_id}/fail", {"error": error}))

    def input(self, job_id: int, codec: str, max_bytes: int) -> tuple[dict[str, Any], np.ndarray]:
        def fetch() -> tuple[dict[str, Any], np.ndarray]:
            with self.session.get(f"{self.base}/jobs/{job_id}/input", params={"codec": codec},
                                  stream=True, timeout=self.timeout) as resp:
                if resp.status_code != 200:
                    self._answer(resp)
                decoder = wire.Decoder(wire.VOLUME_FORMAT, wire.VOLUME_DTYPES, max_bytes,
                                       as_dtype="float32")  # what models take
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    decoder.feed(chunk)
                return decoder.finish()

        return self._retrying(f"job {job_id}: input", fetch)

    def result(self, job_id: int, path: Path) -> dict[str, Any]:
        def upload() -> dict[str, Any]:
            with path.open("rb") as f:
                resp = self.session.put(f"{self.base}/jobs/{job_id}/result", data=f,
                                        headers={"Content-Type": wire.CONTENT_TYPE},
                                        timeout=self.timeout)
            return self._answer(resp)

        return self._retrying(f"job {job_id}: hand back the result", upload)


def _token(inline: str | None, path: Path | None,
           problems: list[tuple[str, str]]) -> str | None:
    """The worker token from ``worker.token`` or ``worker.token_file`` (exactly one)."""
    if (inline is None) == (path is None):
        problems.append(("worker.token", "give the worker token in token or token_file"
                         " (one of them)"))
        return None
    if path is None:
        return inline
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(("worker.token_file", f"cannot read {path}: {exc.strerror}"))
        return None
    if not text:
        problems.append(("worker.token_file", f"{path} is empty"))
        return None
    return text


def _default_models(models_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(models_dir).iterdir()
                  if (p / "manifest.yaml").is_file()) if Path(models_dir).is_dir() else []


def _atomic_chunks(path: Path, chunks: Iterator[bytes]) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RemoteWorker:
    """One ``dicomnode worker`` process (see the module docstring)."""

    def __init__(self, config: NodeConfig, storage: Path) -> None:
        wc = config.worker
        problems = []
        if config.queue.backend != "celery" or config.queue.url is None:
            problems.append(("queue", "a worker needs queue: {backend: celery, url: redis://...}"))
        if wc.node_url is None:
            problems.append(("worker.node_url", "the node's HTTP address is needed"))
        token = _token(wc.token.get_secret_value() if wc.token else None, wc.token_file,
                       problems)
        if problems:
            raise ConfigError("worker configuration", problems)
        assert config.queue.url is not None and wc.node_url is not None and token is not None
        self.config = config
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.storage / SPOOL).mkdir(exist_ok=True)
        self._lock_fd = self._lock_storage()
        identity = self._identity()
        self.name = wc.name or f"{socket.gethostname()}-{self.storage.resolve().name}"[:64]
        # one owner per storage folder: a restarted worker may still hand back its results
        self.owner = f"{self.name}:{identity['id']}"
        self.models = list(wc.models) or _default_models(config.models_dir)
        if not self.models:
            raise ConfigError("worker configuration",
                              [("worker.models", f"no model folders in {config.models_dir}")])
        self.client = NodeClient(wc.node_url, token, self.owner,
                                 self.name, ca_file=wc.ca_file,
                                 retry_seconds=wc.node_retry_seconds)
        self.started_at = time.time()
        self.device = "cpu"
        self.jobs_done = 0
        self._job: int | None = None
        self._stop = threading.Event()
        self._pool: Any = None
        self._versions: dict[str, str] = {}
        self.max_volume_bytes = 8 << 30
        self._spool_lock = threading.Lock()
        self._uploading: set[int] = set()

    # -- the storage folder ------------------------------------------------------------

    def _lock_storage(self) -> int:
        fd = os.open(self.storage / LOCK, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError("worker storage", [(str(self.storage),
                              "another dicomnode worker uses this folder")]) from None
        return fd

    def _identity(self) -> dict[str, Any]:
        path = self.storage / IDENTITY
        if path.exists():
            return dict(json.loads(path.read_text()))
        data = {"id": uuid.uuid4().hex[:16], "created_at": time.time()}
        _atomic_chunks(path, iter([json.dumps(data).encode()]))
        return data

    # -- start-up ---------------------------------------------------------------------------

    def _beat(self) -> dict[str, Any]:
        return {
            "name": self.name, "owner": self.owner, "host": socket.gethostname(),
            "models": self.models, "device": self.device, "version": __version__,
            "state": "busy" if self._job is not None else "idle", "job_id": self._job,
            "interval": self.config.worker.heartbeat_seconds, "started_at": self.started_at,
            "jobs_done": self.jobs_done,
        }

    def hello(self) -> dict[str, Any] | None:
        """The first heartbeat: a refused token raises :class:`TokenRefused`; a node that
        does not answer yet is logged (the heartbeat thread keeps trying)."""
        try:
            answer = self.client.heartbeat(self._beat())
        except NodeUnavailable as exc:
            LOG.warning("%s; starting anyway (jobs wait until it answers)", exc)
            return None
        LOG.info("node %s accepts worker %s", answer.get("node", "?"), self.name)
        return answer

    def load_models(self) -> None:
        """Load every model once, warm on this worker's device."""
        from dicomnode.inference.device import choose_device
        from dicomnode.worker.pool import ModelPool

        self.device = choose_device(self.config.inference.device)
        self._pool = ModelPool(self.config.models_dir, self.device)
        for name in self.models:
            model = self._pool.get(name)
            self._versions[name] = model.manifest.version
        LOG.info("models warm on %s: %s", self.device,
                 ", ".join(f"{m} {v}" for m, v in self._versions.items()))

    def _heartbeats(self) -> None:
        interval = self.config.worker.heartbeat_seconds
        failing = False
        while not self._stop.wait(interval):
            try:
                self.client.heartbeat(self._beat())
                if failing:
                    LOG.info("the node answers heartbeats again")
                failing = False
                self._flush_spool()
            except TokenRefused as exc:
                LOG.error("%s", exc)
            except Exception as exc:
                if not failing:
                    LOG.warning("heartbeat not delivered: %s", exc)
                failing = True

    def _flush_spool(self) -> None:
        """Hand back results left from a node outage longer than the retry window, or
        from before a restart of this worker (the job in hand is the task's business)."""
        for path in sorted((self.storage / SPOOL).glob("job-*.wire")):
            try:
                job_id = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if job_id != self._job and not self._stop.is_set():
                LOG.info("job %d: handing back a result left in %s", job_id, path.parent)
                self._hand_back(job_id, path)

    # -- one job --------------------------------------------------------------------------

    def run_job(self, job_id: int, model: str) -> str:
        """The task body: returns what happened (for Celery's log)."""
        if model not in self.models:
            return f"job {job_id}: model {model} is not held by this worker; dropped"
        spooled = self.storage / SPOOL / f"job-{job_id}.wire"
        if spooled.exists():  # this worker ran it before a restart: hand it back now
            return self._hand_back(job_id, spooled)
        try:
            lease = self.client.claim(job_id)
        except NodeAnswer as exc:
            LOG.info("job %d: not run (%s); message dropped", job_id, exc.reason)
            return f"job {job_id}: {exc.reason}"
        if "finished" in lease:
            return f"job {job_id}: finished by the node from an earlier prediction"
        self._job = job_id
        try:
            return self._run_claimed(job_id, model, float(lease["lease_seconds"]), spooled)
        finally:
            self._job = None

    def _run_claimed(self, job_id: int, model: str, lease: float, spooled: Path) -> str:
        lost = threading.Event()
        done = threading.Event()

        def keep_lease() -> None:
            while not done.wait(lease / 3):
                try:
                    self.client.extend(job_id)
                except NodeAnswer as exc:
                    LOG.warning("job %d: %s", job_id, exc.reason)
                    lost.set()
                    return
                except Exception as exc:  # node away: it extends leases when it is back
                    LOG.warning("job %d: lease not extended: %s", job_id, exc)

        beat = threading.Thread(target=keep_lease, name=f"lease-{job_id}", daemon=True)
        beat.start()
        try:
            try:
                fetch_started = time.perf_counter()
                header, array = self.client.input(job_id, self.config.worker.input_codec,
                                                  self.max_volume_bytes)
                fetched = time.perf_counter() - fetch_started
            except NodeAnswer as exc:
                LOG.warning("job %d: the node will not send its input: %s", job_id, exc.reason)
                return f"job {job_id}: {exc.reason}"
            try:
                volume = wire.volume_from(header, array)
                del array
                started = time.perf_counter()
                prediction = self._pool.get(model).predict(volume)
                seconds = time.perf_counter() - started
            except Exception as exc:
                LOG.exception("job %d: the model failed", job_id)
                try:
                    answer = self.client.fail(job_id, f"{type(exc).__name__}: {exc}")
                except NodeAnswer as refused:  # the lease went meanwhile: not ours to say
                    return f"job {job_id}: model failed; {refused.reason}"
                return f"job {job_id}: model failed; the job is now {answer.get('state')}"
            head = wire.labels_header(
                job_id=job_id, model=prediction.model_name or model,
                model_version=prediction.model_version or self._versions.get(model, ""),
                device=prediction.device, seconds=seconds,
                slice_keys=volume.sop_instance_uids, measurements=prediction.measurements,
                worker=self.name)
            labels = np.ascontiguousarray(prediction.labels, dtype=np.uint8)
            _atomic_chunks(spooled, wire.encode(head, labels, "deflate"))
            LOG.info("job %d: %s ran in %.2f s on %s (input fetched in %.2f s)", job_id, model,
                     seconds, prediction.device, fetched)
        finally:
            done.set()
        if lost.is_set():
            LOG.warning("job %d: the lease was lost while the model ran; handing back anyway",
                        job_id)
        return self._hand_back(job_id, spooled)

    def _hand_back(self, job_id: int, spooled: Path) -> str:
        with self._spool_lock:
            if job_id in self._uploading:
                return f"job {job_id}: being handed back already"
            self._uploading.add(job_id)
        started = time.perf_counter()
        try:
            answer = self.client.result(job_id, spooled)
        except NodeAnswer as exc:
            spooled.unlink(missing_ok=True)
            LOG.warning("job %d: result not taken: %s", job_id, exc.reason)
            return f"job {job_id}: result not taken ({exc.reason})"
        except NodeUnavailable as exc:
            LOG.error("%s; the result stays in %s and is handed back when the node answers",
                      exc, spooled)
            return f"job {job_id}: node unavailable"
        finally:
            with self._spool_lock:
                self._uploading.discard(job_id)
        spooled.unlink(missing_ok=True)
        self.jobs_done += 1
        state = answer.get("state")
        LOG.info("job %d handed back: %s%s in %.2f s", job_id, state,
                 " (already done)" if answer.get("already") else "", time.perf_counter() - started)
        return f"job {job_id}: {state}"

    # -- the Celery worker -----------------------------------------------------------------

    def celery_app(self) -> Any:
        from celery.exceptions import Reject

        qc = self.config.queue
        assert qc.url is not None
        app = make_celery_app(qc.url, visibility_timeout=qc.visibility_timeout_seconds,
                              main="dicomnode-worker")
        worker = self

        @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True,
                  ignore_result=True)
        def run_job(job_id: int, model: str) -> str:
            try:
                return worker.run_job(int(job_id), str(model))
            except NodeUnavailable as exc:
                LOG.error("%s; the message goes back to the queue", exc)
                raise Reject(str(exc), requeue=True) from None
            except TokenRefused as exc:
                LOG.error("%s; the message goes back to the queue", exc)
                raise Reject(str(exc), requeue=True) from None

        return app

    def run(self) -> int:
        """Start up, then consume until SIGTERM/SIGINT (warm shutdown); the exit status."""
        answer = self.hello()  # TokenRefused propagates: the caller says so and exits 2
        self.load_models()
        if answer is not None:
            self._check_versions(answer)
        beats = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beats.start()
        app = self.celery_app()
        queues = [queue_name(m) for m in self.models]
        LOG.info("worker %s consuming %s from %s", self.name, ", ".join(queues),
                 redact_url(str(self.config.queue.url)))
        try:
            celery_worker = app.Worker(
                hostname=f"{self.name}@{socket.gethostname()}", queues=queues, pool="solo",
                concurrency=1, loglevel=logging.getLevelName(LOG.getEffectiveLevel()),
                without_gossip=True, without_mingle=True, without_heartbeat=True,
                optimization="fair", quiet=True)
            celery_worker.start()
            return int(celery_worker.exitcode or 0)
        finally:
            self._stop.set()
            beats.join(5)
            app.close()

    def _check_versions(self, answer: dict[str, Any]) -> None:
        manifests = answer.get("manifests") or {}
        for name in list(self.models):
            expected = manifests.get(name)
            if expected is not None and expected != self._versions.get(name):
                LOG.error("model %s: this worker holds version %s, the node's manifest is %s;"
                          " its jobs are left to other workers", name, self._versions.get(name),
                          expected)
                self.models.remove(name)
        if not self.models:
            raise ConfigError("worker configuration", [
                ("models", "none of this worker's models matches the node's versions")])

    def close(self) -> None:
        self._stop.set()
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
