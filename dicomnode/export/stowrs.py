"""STOW-RS: storing instances over HTTP(S) with DICOMweb (PS3.18 10.5).

:class:`StowRsSender` posts files to ``{url}/studies`` with dicomweb-client (its own
retries turned off: the outbox retries) and reads the Store Instances Response
(PS3.18 Table 10.5.3-1) for a per-instance outcome:

* an instance in ReferencedSOPSequence (0008,1199): ok (a WarningReason is kept as
  the reason);
* an instance in FailedSOPSequence (0008,1198): its FailureReason (0008,1197), a
  C-STORE status, is classified like a DIMSE status
  (:func:`~dicomnode.export.base.classify_status`): 0x0111 "duplicate" is ok (a 409
  Conflict that only says "you sent this before" is a success for us), 0xA7xx
  transient, 0xA9xx / 0xCxxx permanent;
* an instance the response does not mention: from the HTTP status -- 2xx ok, 408 / 429
  / 5xx and connection errors or timeouts transient, any other 4xx permanent.

Where a server answers a batch with a bare 4xx (Orthanc does, with empty sequences,
for a part it cannot parse), the files it did not account for are sent again one by
one, so one bad file does not fail its neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from dicomnode.export.base import (
    DeliveryOutcome,
    Result,
    Sender,
    StatusClassifier,
    classify_status,
    describe_status,
)

LOG = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-1 (Store Instances Response Module)
TAG_FAILED_SOP_SEQUENCE = 0x00081198
TAG_REFERENCED_SOP_SEQUENCE = 0x00081199
TAG_REFERENCED_SOP_INSTANCE_UID = 0x00081155
TAG_FAILURE_REASON = 0x00081197
TAG_WARNING_REASON = 0x00081196

_TRANSIENT_HTTP = frozenset({408, 425, 429})
DEFAULT_BATCH_BYTES = 32 * 1024 * 1024


def http_result(status: int) -> Result:
    """Classify an HTTP status that says nothing per instance."""
    if 200 <= status < 300:
        return Result.OK
    if status >= 500 or status in _TRANSIENT_HTTP:
        return Result.TRANSIENT
    return Result.PERMANENT


def parse_store_response(
    body: pydicom.Dataset | None,
) -> tuple[dict[str, int | None], dict[str, int]]:
    """``(referenced, failed)`` of a Store Instances Response: SOP Instance UID ->
    WarningReason (or None), and SOP Instance UID -> FailureReason."""
    referenced: dict[str, int | None] = {}
    failed: dict[str, int] = {}
    if body is None:
        return referenced, failed
    for tag, target in ((TAG_REFERENCED_SOP_SEQUENCE, "ref"), (TAG_FAILED_SOP_SEQUENCE, "fail")):
        if tag not in body or not body[tag].value:
            continue
        for item in body[tag].value:
            if TAG_REFERENCED_SOP_INSTANCE_UID not in item:
                continue
            uid = str(item[TAG_REFERENCED_SOP_INSTANCE_UID].value)
            if target == "ref":
                warn = item[TAG_WARNING_REASON].value if TAG_WARNING_REASON in item else None
                referenced[uid] = None if warn in (None, "") else int(warn)
            else:
                code = item[TAG_FAILURE_REASON].value if TAG_FAILURE_REASON in item else None
                failed[uid] = 0xC000 if code in (None, "") else int(code)  # unstated: failure
    return referenced, failed


def interpret(
    http_status: int,
    body: pydicom.Dataset | None,
    uids: list[str],
    *,
    classify: StatusClassifier = classify_status,
) -> list[tuple[Result, str | None, int | None, bool]]:
    """The outcome of each instance (by SOP Instance UID) of one STOW-RS request.

    Returns ``(result, reason, status, mentioned)`` per UID; ``mentioned`` is False
    where the response said nothing about the instance and the HTTP status decided.
    """
    referenced, failed = parse_store_response(body)
    out: list[tuple[Result, str | None, int | None, bool]] = []
    for uid in uids:
        if uid in failed:
            code = failed[uid]
            result = classify(code)
            out.append((result, f"HTTP {http_status}, {describe_status(code)}", code, True))
        elif uid in referenced:
            warn = referenced[uid]
            reason = None if warn is None else f"HTTP {http_status}, warning 0x{warn:04X}"
            out.append((Result.OK, reason, warn if warn is not None else 0, True))
        else:
            result = http_result(http_status)
            reason = None if result is Result.OK else f"HTTP {http_status}"
            if result is Result.OK and (referenced or failed):
                # the server listed other instances but not this one: not acknowledged
                result, reason = Result.TRANSIENT, f"HTTP {http_status}, instance not acknowledged"
            out.append((result, reason, http_status, False))
    return out


def _stow_base(url: str) -> str:
    """The DICOMweb root: ``url`` without a trailing slash or ``/studies``."""
    base = url.rstrip("/")
    if base.endswith("/studies"):
        base = base[: -len("/studies")]
    return base


def _response_dataset(response: requests.Response | None) -> pydicom.Dataset | None:
    if response is None or not response.content:
        return None
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    # Orthanc 1.10 sends its error answers without a Content-Type: sniff for JSON then
    if kind not in ("application/dicom+json", "application/json") and not (
        not kind and response.content.lstrip()[:1] == b"{"
    ):
        return None  # XML answers carry the same module; only JSON is read here
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # a body that is not a Store Instances Response
        LOG.debug("unreadable STOW-RS response body", exc_info=True)
        return None


class StowRsSender(Sender):
    """The outbox's :class:`~dicomnode.export.base.Sender` for a DICOMweb origin server.

    ``url`` is the DICOMweb root (``https://pacs/dicom-web``; a trailing
    ``/studies`` is removed). ``timeout`` bounds connecting and each read; ``headers``
    (e.g. an ``Authorization`` header) and ``session`` (a :class:`requests.Session`
    with TLS client certificates, say) go to dicomweb-client. A batch is split into
    requests of at most ``max_request_bytes`` of files.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
        classify: StatusClassifier = classify_status,
        max_request_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, not {url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, not {timeout!r}")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be positive, not {max_request_bytes!r}")
        self.url = _stow_base(url)
        self.label = f"stowrs {self.url}"
        self.timeout = float(timeout)
        self.headers = dict(headers or {})
        self.classify = classify
        self.max_request_bytes = int(max_request_bytes)
        self._session = session
        self._client: DICOMwebClient | None = None

    def _get_client(self) -> DICOMwebClient:
        if self._client is None:
            client = DICOMwebClient(
                self.url,
                session=self._session,
                headers=self.headers or None,
                timeout=self.timeout,
                # one request, never chunked transfer encoding, for bodies up to this
                chunk_size=self.max_request_bytes * 2,
            )
            client.set_http_retry_params(retry=False)  # the outbox retries, with backoff
            self._client = client
        return self._client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._session is None:
            try:
                client._session.close()
            except Exception:  # pragma: no cover - best effort
                LOG.debug("closing the STOW-RS session failed", exc_info=True)

    # -- sending -------------------------------------------------------------------------

    def send(self, files: list[Path]) -> list[DeliveryOutcome]:
        outcomes: list[DeliveryOutcome | None] = [None] * len(files)
        loaded: list[tuple[int, Path, pydicom.Dataset, str, int]] = []
        for i, raw in enumerate(files):
            path = Path(raw)
            try:
                ds = pydicom.dcmread(path)
                uid = str(ds.SOPInstanceUID)
                size = path.stat().st_size
            except Exception as exc:
                outcomes[i] = DeliveryOutcome.permanent(path, f"cannot read {path.name}: {exc}")
                continue
            loaded.append((i, path, ds, uid, size))
        for batch in self._requests(loaded):
            for (i, *_), outcome in zip(batch, self._post(batch), strict=True):
                outcomes[i] = outcome
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    def _requests(
        self, loaded: list[tuple[int, Path, pydicom.Dataset, str, int]]
    ) -> list[list[tuple[int, Path, pydicom.Dataset, str, int]]]:
        batches: list[list[tuple[int, Path, pydicom.Dataset, str, int]]] = []
        current: list[tuple[int, Path, pydicom.Dataset, str, int]] = []
        size = 0
        for entry in loaded:
            if current and size + entry[4] > self.max_request_bytes:
                batches.append(current)
                current, size = [], 0
            current.append(entry)
            size += entry[4]
        if current:
            batches.append(current)
        return batches

    def _post(self, batch: list[tuple[int, Path, pydicom.Dataset, str, int]]) -> list[DeliveryOutcome]:
        paths = [e[1] for e in batch]
        uids = [e[3] for e in batch]
        try:
            body: pydicom.Dataset | None = self._get_client().store_instances([e[2] for e in batch])
            status = 200
        except requests.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else 0
            body = _response_dataset(response)
        except requests.RequestException as exc:  # connection refused, timeout, TLS, ...
            LOG.warning("STOW-RS to %s failed: %s", self.url, exc)
            self.close()
            return [DeliveryOutcome.transient(p, f"{self.url}: {_short(exc)}") for p in paths]
        except Exception as exc:  # encoding one of the data sets failed
            if len(batch) > 1:
                return [o for e in batch for o in self._post([e])]
            return [DeliveryOutcome.permanent(paths[0], f"cannot encode {paths[0].name}: {exc}")]
        results = interpret(status, body, uids, classify=self.classify)
        if len(batch) > 1 and any(
            not mentioned and result is Result.PERMANENT for result, _, _, mentioned in results
        ):
            # a bare 4xx for a batch: find out which file(s) it was about
            LOG.info("STOW-RS to %s: HTTP %d for %d files; sending them one by one",
                     self.url, status, len(batch))
            out: list[DeliveryOutcome] = []
            for entry, (result, reason, code, mentioned) in zip(batch, results, strict=True):
                if mentioned:
                    out.append(DeliveryOutcome(entry[1], result, reason, code))
                else:
                    out.extend(self._post([entry]))
            return out
        outcomes = [
            DeliveryOutcome(p, result, reason, code)
            for p, (result, reason, code, _) in zip(paths, results, strict=True)
        ]
        failed = sum(1 for o in outcomes if not o.ok)
        if failed:
            LOG.warning("STOW-RS to %s: %d of %d instances not stored (HTTP %d)",
                        self.url, failed, len(outcomes), status)
        return outcomes


def _short(exc: BaseException) -> str:
    """An exception in one line, without the urllib3 pool noise where possible."""
    text = str(exc)
    if isinstance(exc, requests.ConnectionError):
        return "connection failed" + (" (refused)" if "refused" in text.lower() else "")
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return text.splitlines()[0][:200] if text else type(exc).__name__
