"""The status page at ``/``: what the node holds, runs and sends, for a person.

Server-side HTML (Jinja2 templates in ``web/templates``, no script, no external asset),
refreshed by the browser every :data:`REFRESH_SECONDS`, laid out for a phone as for a
desk. It shows:

* the studies received (patient, date, description, modalities; received, complete,
  revision; instances and results), each with its DICOMweb thumbnail and a link to the
  viewer (``/viewer/viewer?StudyInstanceUIDs=<uid>``);
* the jobs (state, model, attempts, timings, error);
* the deliveries per destination (pending, sent, failed, with the last failure reasons);
* for each result, an overlay thumbnail (:mod:`dicomnode.web.overlay`) and the model's
  measurements as a table (the job's stored inference result, the numbers the SR holds).

**Who sees it.** The page answers the same callers as DICOMweb (:class:`~dicomnode.web.auth.Gate`):
with tokens configured, a caller without a bearer token or a session is sent to
``/login`` (or answered 401 where there is no sign-in page) and never sees a patient
identifier; without tokens, DICOMweb is open and so is the page.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dicomnode.core.index import Index
from dicomnode.core.manifest import load_manifest
from dicomnode.core.records import InferenceResult
from dicomnode.core.reports import StudyOverview
from dicomnode.web.overlay import OverlayCache, OverlayError, label_colors, render_overlay

LOG = logging.getLogger(__name__)

REFRESH_SECONDS = 15
VIEWER = "/viewer/viewer?StudyInstanceUIDs="
TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_ROWS = 50  # studies and jobs shown
MAX_RESULTS = 12  # results (overlay + measurements) shown


@dataclass
class ResultView:
    """One job's result as the page shows it."""

    job_id: int
    model: str
    model_version: str
    study_uid: str
    finished: float
    seconds: float
    model_seconds: float
    objects: dict[str, int]
    quantities: list[str]
    rows: list[tuple[str, tuple[int, int, int] | None, list[str]]]


@dataclass
class Page:
    """Everything one rendering of the page shows."""

    ae_title: str
    now: float
    studies: list[StudyOverview]
    jobs: list[dict[str, Any]]
    job_counts: dict[str, int]
    deliveries: dict[str, dict[str, int]]
    failures: list[dict[str, Any]]
    results: list[ResultView]
    has_queue: bool
    has_outbox: bool
    notes: list[str] = field(default_factory=list)


class StatusPage:
    """The ``/`` page and the overlay images it shows."""

    def __init__(self, ae_title: str, index: Index, storage: Path, *,
                 queue: Any = None, outbox: Any = None, models_dir: Path | None = None,
                 gate: Any = None, login_path: str | None = None) -> None:
        import jinja2
        from starlette.templating import Jinja2Templates

        self.ae_title = ae_title
        self.index = index
        self.storage = Path(storage)
        self.queue = queue
        self.outbox = outbox
        self.models_dir = models_dir
        self.gate = gate
        self.login_path = login_path
        self.overlays = OverlayCache()
        # every value escaped (names and reasons come from the network); a typo in a
        # template fails loudly instead of printing nothing
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                 autoescape=True, undefined=jinja2.StrictUndefined)
        self.templates = Jinja2Templates(env=env)
        env.filters["when"] = _when
        env.filters["ago"] = lambda ts: _ago(ts, time.time())
        env.filters["person"] = _person
        env.filters["seconds"] = _seconds
        env.filters["date"] = _date
        env.globals["viewer"] = lambda uid: VIEWER + quote(uid, safe=".")

    def routes(self) -> list[Route]:
        return [Route("/", self.page, methods=["GET", "HEAD"]),
                Route("/status/jobs/{job_id:int}/overlay.png", self.overlay,
                      methods=["GET", "HEAD"])]

    def _refused(self, request: Request, page: bool) -> Response | None:
        """None when the caller may read; else where it goes instead (no patient data)."""
        if self.gate is None or self.gate.allows(request.scope):
            return None
        if page and self.login_path is not None:
            return RedirectResponse(f"{self.login_path}?next=/", status_code=303)
        return PlainTextResponse("Unauthorized", 401, headers={
            "WWW-Authenticate": 'Bearer realm="dicomnode"', "Cache-Control": "no-store"})

    async def page(self, request: Request) -> Response:
        refused = self._refused(request, page=True)
        if refused is not None:
            return refused
        try:
            data = await run_in_threadpool(self.collect)
        except Exception:
            LOG.exception("the status page cannot be made")
            return HTMLResponse("<p>The status cannot be read now; see the node's log.</p>",
                                500)
        return self.templates.TemplateResponse(
            request, "status.html", {"page": data, "refresh": REFRESH_SECONDS},
            headers={"Cache-Control": "no-store"})

    async def overlay(self, request: Request) -> Response:
        refused = self._refused(request, page=False)
        if refused is not None:
            return refused
        job_id = int(request.path_params["job_id"])
        png = await run_in_threadpool(self._overlay_png, job_id)
        if png is None:
            return PlainTextResponse("no overlay for this job", 404)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    def _overlay_png(self, job_id: int) -> bytes | None:
        if self.queue is None:
            return None
        job = self.queue.get(job_id)
        if job is None or not job.result:
            return None
        cached = self.overlays.get(job.key)
        if cached is not None:
            return cached
        try:
            result = InferenceResult.from_json(job.result)
            png = render_overlay(result, self.storage, self.index, self.models_dir)
        except (OverlayError, ValueError) as exc:
            LOG.warning("no overlay for job %s: %s", job_id, exc)
            return None
        self.overlays.put(job.key, png)
        return png

    # -- what the page shows ---------------------------------------------------------

    def collect(self) -> Page:
        now = time.time()
        page = Page(self.ae_title, now, self.index.recent_studies(MAX_ROWS), [], {}, {}, [],
                    [], self.queue is not None, self.outbox is not None)
        if self.queue is not None:
            page.job_counts = {state.value: n for state, n in self.queue.counts().items() if n}
            page.jobs = [self._job(j) for j in self.queue.recent(MAX_ROWS)]
            done = [j for j in self.queue.recent(MAX_RESULTS, ["done"]) if j.result]
            page.results = [r for r in (self._result(j) for j in done) if r is not None]
        if self.outbox is not None:
            page.deliveries = {dest: {s.value: n for s, n in counts.items()}
                               for dest, counts in sorted(self.outbox.summary().items())}
            page.failures = _failures([*self.outbox.list(["failed"]),
                                       *(d for d in self.outbox.list(["pending"])
                                         if d.last_error)])
        return page

    @staticmethod
    def _job(job: Any) -> dict[str, Any]:
        payload = job.payload or {}
        result = job.result or {}
        return {
            "id": job.id, "model": job.model, "state": job.state.value,
            "priority": getattr(job.priority, "name", str(job.priority)),
            "attempts": job.attempts, "max_attempts": job.max_attempts,
            "created": job.created_at, "updated": job.updated_at,
            "study_uid": payload.get("study_uid", ""), "rule": payload.get("rule", ""),
            "seconds": result.get("seconds"), "model_seconds": result.get("model_seconds"),
            "error": job.last_error or "",
        }

    def _result(self, job: Any) -> ResultView | None:
        try:
            result = InferenceResult.from_json(job.result)
        except ValueError as exc:
            LOG.warning("job %s: its stored result cannot be read: %s", job.id, exc)
            return None
        manifest = None
        if self.models_dir is not None:
            try:
                manifest = load_manifest(self.models_dir / result.model)
            except Exception:
                manifest = None
        by_name = {lab.name: lab.value for lab in manifest.labels} if manifest else {}
        colors = label_colors(manifest, sorted(by_name.values()))
        quantities: list[str] = []
        for q in result.measurements.values():
            quantities += [k for k in q if k not in quantities]
        quantities.sort(key=lambda k: k != "volume")  # the size first, then as stored
        rows = []
        for name, q in result.measurements.items():
            color = colors.get(by_name[name]) if name in by_name else None
            rows.append((name, color, [_quantity(q.get(k)) for k in quantities]))
        units = {k: next((q[k][1] for q in result.measurements.values() if k in q), "")
                 for k in quantities}
        objects = {k: len(v) for k, v in (job.result.get("objects") or {}).items()}
        return ResultView(job.id, result.model, result.model_version,
                          result.payload.study_uid, job.updated_at, result.seconds,
                          result.model_seconds, objects,
                          [f"{k} ({_UNITS.get(units[k], units[k])})" if units[k] else k
                           for k in quantities], rows)


def _failures(deliveries: list[Any]) -> list[dict[str, Any]]:
    """Failed or retried deliveries grouped by destination, state and reason, the most
    recent first (at most 20 groups)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for d in deliveries:
        reason = d.last_error or d.last_result or ""
        g = groups.setdefault((d.destination, d.state.value, reason), {
            "destination": d.destination, "state": d.state.value, "error": reason,
            "objects": 0, "attempts": 0, "updated": 0.0})
        g["objects"] += 1
        g["attempts"] = max(g["attempts"], d.attempts)
        g["updated"] = max(g["updated"], d.updated_at)
    return sorted(groups.values(), key=lambda g: -g["updated"])[:20]


#: UCUM units (PS3.16 CID 7181) as a reader expects them
_UNITS = {"[hnsf'U]": "HU", "ml": "ml", "%": "%", "mm": "mm", "cm3": "cm³", "mm3": "mm³"}


def _quantity(value: Any) -> str:
    if value is None:
        return ""
    number = float(value[0])
    return f"{number:.1f}"


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    d = max(0.0, now - float(ts))
    if d < 90:
        return f"{d:.0f} s ago"
    if d < 5400:
        return f"{d / 60:.0f} min ago"
    if d < 172800:
        return f"{d / 3600:.0f} h ago"
    return f"{d / 86400:.0f} days ago"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{float(value):.1f} s"


def _person(name: str) -> str:
    """A DICOM Person Name for reading: 'DOE^JOHN' -> 'DOE, JOHN' (alphabetic group)."""
    parts = [p for p in str(name or "").split("=")[0].split("^") if p]
    if not parts:
        return ""
    return parts[0] + (", " + " ".join(parts[1:]) if len(parts) > 1 else "")


def _date(value: str) -> str:
    v = str(value or "")
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else v
