"""A real browser: Debian's Chromium, headless, driven by Playwright, reads the node's
results in OHIF at /viewer/ as a radiologist would.

A node with a rule to ``lung_density`` receives the shared chest CT (or, where
../shared is absent, the synthetic chest phantom of dicomnode.phantom) and makes its
SEG and SR. Then, in OHIF served by the node itself:

1. the study opens from ``study_link`` and the CT is drawn;
2. the SEG (double-click, "Yes") is loaded onto the CT; on the slice where the lungs
   are largest, the screenshot's pixels at points computed from the SEG and its
   geometry (the deepest point of each segment, mapped through OHIF's own camera) have
   the segment's colour, and points outside the body and in the mediastinum have none;
3. the SR (double-click) is drawn without an error in the page, and the measurement
   text OHIF writes (the lines tests/ohif_sr.py predicts from the SR) is on the page,
   for each finding in turn (the viewport's arrows), its volume line inside the
   viewport, no two findings' text over each other. OHIF 3.13.2 sometimes opens the SR
   after a SEG without drawing the first finding until the reader steps through the
   findings; the test then does that and says so in the report ("retries").

Screenshots (and report.json: sampled colours, timings, console) go to
test-artifacts/ohif/<case>/. No browser is ever downloaded (the system
Chromium at /usr/bin/chromium; never ``playwright install``); the page may reach only
127.0.0.1, anything else is blocked and fails the test.

Destination: a rule's results are stored and indexed in the node (so OHIF can read
them) once they are encoded for a destination; this test gives the rule a DCMTK
storescp as destination. Where a rule with no destination keeps its results too, the
destination can go.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import ROOT, SHARED_DATA, ReferenceSCP, dicom_files, index_query, storescu
from ohif_sr import shown_on

from dicomnode.web.viewer import ViewerInstall, default_viewer_dir, study_link

pytestmark = pytest.mark.timeout(900)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "ohif"
CHEST = SHARED_DATA / "tcia-lung-pet-ct-dx" / "Lung_Dx-A0001" / "CT_chest_5mm_kernelB"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
STEP_TIMEOUT_MS = 90_000


def _need_browser() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (scripts/install-system-deps installs it)")
    if ViewerInstall.find(default_viewer_dir()) is None:
        pytest.skip(f"OHIF is not installed in {default_viewer_dir()} (make viewer)")
    return sync_api


@dataclass
class Served:
    base: str
    study_uid: str
    ct: dict[str, Path]  # SOP Instance UID -> CT file
    seg: Path
    sr: Path
    source: str
    seconds_to_results: float
    name: str  # screenshots go to test-artifacts/ohif/<name>/


@pytest.fixture(params=["chest-ct", "phantom"])
def served(request: Any, node_factory: Any, tmp_path: Path) -> Iterator[Served]:
    """The node with its results for the shared chest CT (skipped where ../shared is
    absent) and for the synthetic chest phantom (always)."""
    _need_browser()
    if request.param == "chest-ct":
        if not CHEST.is_dir():
            pytest.skip(f"shared test data not available: {CHEST} (the phantom case runs)")
        files, source = dicom_files(CHEST), "shared chest CT (TCIA Lung-PET-CT-Dx A0001)"
    else:
        from dicomnode.phantom import make_chest_phantom

        files, source = make_chest_phantom(tmp_path / "phantom"), "synthetic chest phantom"
    scp = ReferenceSCP(tmp_path / "pacs")
    try:
        node = node_factory({
            "models_dir": str(ROOT / "models"),
            "audit": {"enabled": False},
            "destinations": [{"name": "pacs", "ae_title": "REFSCP", "host": "127.0.0.1",
                              "port": scp.port, "objects": ["seg", "sr"]}],
            "routing": [{"name": "lung", "model": "lung_density", "destinations": ["pacs"],
                         "match": {"modality": ["CT"], "body_part": "chest|lung|thorax",
                                   "orientation": "axial"}}],
        }).start(timeout=120)
        started = time.monotonic()
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr

        def results() -> dict[str, str]:
            rows = index_query(node.storage, "SELECT sop_class_uid, path FROM instances "
                               "WHERE origin = 'result'")
            return {c: p for c, p in rows}
        node.wait_for(lambda: {SEG_CLASS, SR_CLASS} <= set(results()), timeout=300)
        took = time.monotonic() - started
        found = results()
        ct = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ct[str(ds.SOPInstanceUID)] = Path(f)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        yield Served(f"http://127.0.0.1:{node.http_port}", study, ct,
                     node.storage / found[SEG_CLASS], node.storage / found[SR_CLASS], source, took,
                     request.param)
    finally:
        scp.stop()


# -- where to look: from the SEG and its geometry ----------------------------------------


@dataclass
class Probe:
    name: str
    world: list[float]  # patient coordinates (mm)
    expect: tuple[int, int, int] | None  # segment colour, or None: no overlay


def _probes(served: Served) -> tuple[str, list[Probe], dict[int, tuple[int, int, int]]]:
    """The slice where the segments are largest together, and points on it: the deepest
    point of each segment, two points outside the body, one in the mediastinum."""
    from scipy import ndimage

    seg = pydicom.dcmread(served.seg)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    colours = {}
    for s in seg.SegmentSequence:
        colours[int(s.SegmentNumber)] = _cielab_to_rgb(
            [int(v) for v in s.RecommendedDisplayCIELabValue])
    per_sop: dict[str, dict[int, np.ndarray]] = {}
    position: dict[str, list[float]] = {}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        sop = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        per_sop.setdefault(sop, {})[number] = frames[f].astype(bool)
        position[sop] = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]

    def world(sop: str, i: float, j: float) -> list[float]:
        p = np.array(position[sop]) + j * spacing[1] * row_dir + i * spacing[0] * col_dir
        return [float(v) for v in p]

    sop = max(per_sop, key=lambda u: min(int(m.sum()) for m in per_sop[u].values()))
    masks = per_sop[sop]
    probes = []
    deepest = {}
    for number, mask in sorted(masks.items()):
        depth = ndimage.distance_transform_edt(mask)
        i, j = np.unravel_index(int(np.argmax(depth)), mask.shape)
        assert depth[i, j] >= 6, "segment too thin on its largest slice to sample"
        deepest[number] = (i, j)
        probes.append(Probe(f"segment {number} interior", world(sop, i, j), colours[number]))
    anything = np.logical_or.reduce(list(masks.values()))
    hu = pydicom.dcmread(served.ct[sop])
    image = hu.pixel_array * float(hu.RescaleSlope) + float(hu.RescaleIntercept)
    assert image.shape == anything.shape
    body = ndimage.binary_fill_holes(image > -500)
    outside = ndimage.distance_transform_edt(~body) > 15
    rows, cols = image.shape
    picked = 0
    for i, j in ((rows // 12, cols // 2), (rows // 2, cols // 14), (rows // 2, cols - cols // 14),
                 (rows // 10, cols // 10)):
        if outside[i, j] and not anything[i, j] and picked < 2:
            probes.append(Probe(f"outside the body ({i},{j})", world(sop, i, j), None))
            picked += 1
    assert picked == 2, "no air outside the body on this slice to sample"
    (i1, j1), (i2, j2) = deepest[1], deepest[2]
    # the mediastinum: soft tissue inside the body, 6+ pixels from any segment, nearest
    # to the midpoint between the two lungs
    tissue = body & (image > -300) & (ndimage.distance_transform_edt(~anything) >= 6)
    tissue &= ndimage.distance_transform_edt(body) >= 10  # not the skin
    candidates = np.argwhere(tissue)
    assert len(candidates), "no soft tissue between the lungs to sample"
    mid = np.array([(i1 + i2) / 2.0, (j1 + j2) / 2.0])
    best = tuple(int(v) for v in candidates[np.argmin(((candidates - mid) ** 2).sum(axis=1))])
    probes.append(Probe(f"mediastinum {best}", world(sop, *best), None))
    return sop, probes, colours


def _cielab_to_rgb(value: list[int]) -> tuple[int, int, int]:
    """The sRGB of a Recommended Display CIELab Value (PS3.3 C.10.7.1.1)."""
    from highdicom.color import CIELabColor

    r, g, b = CIELabColor.from_dicom_value(value).to_rgb(clip=True)
    return int(r), int(g), int(b)


# -- the browser -----------------------------------------------------------------------------

_WATCH = """
window.__errors = [];
window.addEventListener('unhandledrejection', e => {
  window.__errors.push('unhandledrejection: ' + String(e.reason && e.reason.stack || e.reason));
});
"""


class Browser:
    """One headless Chromium page on the node's origin, its errors and screenshots."""

    def __init__(self, sync_api: Any, base: str, folder: Path) -> None:
        self.folder = folder
        self._pw = sync_api.sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                args=CHROMIUM_ARGS)
        self.context = self.browser.new_context(viewport={"width": 1400, "height": 900},
                                                device_scale_factor=1)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.console: list[str] = []
        self.blocked: list[str] = []
        self.page.add_init_script(_WATCH)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", self._on_console)
        self.page.route("**/*", self._only_local(base))
        self.shots: list[Path] = []

    def _only_local(self, base: str) -> Any:
        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(base + "/") or url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                self.blocked.append(url)
                r.abort()
        return route

    def _on_console(self, msg: Any) -> None:
        line = f"console.{msg.type}: {msg.text}"
        self.console.append(line)
        if msg.type == "error":
            self.errors.append(line)

    def shot(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        self.page.screenshot(path=str(path))
        self.shots.append(path)
        return path

    def all_errors(self) -> list[str]:
        return self.errors + list(self.page.evaluate("() => window.__errors || []"))

    def close(self) -> None:
        try:
            self.context.close()
            self.browser.close()
        finally:
            self._pw.stop()


_VIEWPORT = "cornerstone.getRenderingEngines().flatMap(e => e.getViewports())" \
            ".find(v => v.getImageIds && v.getImageIds().length > 0)"


def _show_slice(page: Any, sop: str) -> None:
    index = page.evaluate(f"""(sop) => {{
        const v = {_VIEWPORT};
        const i = v.getImageIds().findIndex(id => id.includes('/instances/' + sop + '/'));
        if (i >= 0) {{ v.setImageIdIndex(i); }}
        return i; }}""", sop)
    assert index >= 0, "the CT slice is not in the viewport's stack"
    page.wait_for_function(f"""(sop) => {{ const v = {_VIEWPORT};
        return v.getCurrentImageId().includes('/instances/' + sop + '/'); }}""", arg=sop,
        timeout=STEP_TIMEOUT_MS)
    time.sleep(2.0)  # a few frames for the labelmap to be drawn on the new slice


_ANNOTATIONS = f"""() => {{
    const v = {_VIEWPORT};
    return {{
        current: v ? v.getCurrentImageId() : null,
        annotations: cornerstoneTools.annotation.state.getAllAnnotations().map(a => ({{
            tool: a.metadata.toolName, uid: a.annotationUID, image: a.metadata.referencedImageId,
            frameOfReference: a.metadata.FrameOfReferenceUID, label: a.data && a.data.label}})),
        toolGroups: cornerstoneTools.ToolGroupManager.getAllToolGroups().map(g => ({{
            id: g.id, viewports: g.getViewportIds(),
            sr: g.toolOptions && g.toolOptions.DICOMSRDisplay
                ? g.toolOptions.DICOMSRDisplay.mode : null}})),
        viewports: cornerstone.getRenderingEngines().flatMap(e => e.getViewports()).map(
            x => ({{id: x.id, actors: x.getActors ? x.getActors().length : -1,
                    element: x.element ? x.element.className : null}})),
    }}; }}"""


def _open_series(page: Any, modality: str, ready: Any, report: dict[str, Any],
                 nudge: tuple[str, Any] | None = None, attempts: int = 3) -> None:
    """Double-click the study browser's ``modality`` series until ``ready`` (a locator)
    shows; ``nudge`` (optional: what, how) is what a reader does when it does not, tried
    before the double-click is. Every retry is written in the report."""
    item = page.locator('[data-cy="study-browser-thumbnail-no-image"]').filter(
        has_text=modality).first
    wait = STEP_TIMEOUT_MS // (2 * attempts)
    for attempt in range(1, attempts + 1):
        item.dblclick(timeout=STEP_TIMEOUT_MS)
        try:
            ready.first.wait_for(timeout=wait)
            return
        except Exception:
            pass
        if nudge is not None:
            nudge[1]()
            try:
                ready.first.wait_for(timeout=wait)
                report.setdefault("retries", []).append(f"{modality}: shown after {nudge[0]}")
                return
            except Exception:
                pass
        report.setdefault("retries", []).append(f"{modality}: double-click {attempt} not shown")
    raise AssertionError(f"OHIF did not show the {modality} series after {attempts} tries")


def _step_through_findings(page: Any) -> None:
    """Step to the next finding and back with the SR viewport's arrows."""
    # OHIF 3.13.2: after a SEG was loaded, a double-clicked SR viewport sometimes opens on
    # its first finding's image without the outlines and text (its SR tool has not been
    # told which findings to draw); they appear once the reader steps through findings.
    arrows = page.locator('[data-cy="viewport-action-arrows-right"]')
    arrows.first.wait_for(timeout=STEP_TIMEOUT_MS)
    arrows.first.click()
    time.sleep(1.0)
    page.locator('[data-cy="viewport-action-arrows-left"]').first.click()


def _to_page(page: Any, points: list[list[float]]) -> list[tuple[float, float]]:
    """Page pixels of patient points, through the viewport's own camera."""
    out = page.evaluate(f"""(points) => {{ const v = {_VIEWPORT};
        const r = v.canvas.getBoundingClientRect();
        return points.map(p => {{ const c = v.worldToCanvas(p); return [r.x + c[0], r.y + c[1]]; }});
        }}""", points)
    return [(float(x), float(y)) for x, y in out]


def _colour_at(png: Path, x: float, y: float) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    i, j = int(round(y)), int(round(x))
    return image[i - 1 : i + 2, j - 1 : j + 2].reshape(-1, 3).mean(axis=0)


def _chroma(rgb: np.ndarray) -> float:
    return float(rgb.max() - rgb.min())


def test_ohif_shows_the_seg_on_the_lungs_and_the_sr_measurements(served: Served) -> None:
    sync_api = _need_browser()
    timings: dict[str, float] = {"results (s after the first instance was sent)":
                                 round(served.seconds_to_results, 1)}
    sop, probes, colours = _probes(served)
    sr = pydicom.dcmread(served.sr)
    expected = shown_on(sr, set(served.ct))
    folder = ARTIFACTS / served.name
    shutil.rmtree(folder, ignore_errors=True)
    browser = Browser(sync_api, served.base, folder)
    page = browser.page
    report: dict[str, Any] = {"source": served.source, "study": served.study_uid}
    failed = True
    try:
        t0 = time.monotonic()
        page.goto(served.base + study_link(served.study_uid))
        page.wait_for_function(f"() => window.cornerstone && {_VIEWPORT} && "
                               f"{_VIEWPORT}.getCurrentImageId()", timeout=STEP_TIMEOUT_MS)
        # OHIF's first-visit tour and its "for investigational use only" notice
        page.get_by_text("Skip all").first.click(timeout=STEP_TIMEOUT_MS)
        notice = page.locator('[data-cy="confirm-and-hide-button"]')
        notice.first.click(timeout=STEP_TIMEOUT_MS)
        timings["CT shown"] = round(time.monotonic() - t0, 1)
        time.sleep(1.0)
        browser.shot("01-study-opened.png")

        # the same slice before the SEG: none of the probes is coloured by the CT itself
        _show_slice(page, sop)
        bare = browser.shot("02-ct-slice-without-seg.png")
        for probe, (x, y) in zip(probes, _to_page(page, [p.world for p in probes]), strict=True):
            rgb = _colour_at(bare, x, y)
            assert _chroma(rgb) < 6, f"{probe.name} is coloured without the SEG: {rgb}"

        # -- the SEG onto the CT
        t1 = time.monotonic()
        _open_series(page, "SEG", page.get_by_role("button", name="Yes"), report)
        page.get_by_role("button", name="Yes").click(timeout=STEP_TIMEOUT_MS)
        page.wait_for_function("() => cornerstoneTools.segmentation.state.getSegmentations()"
                               ".length > 0", timeout=STEP_TIMEOUT_MS)
        _show_slice(page, sop)
        timings["SEG loaded and drawn"] = round(time.monotonic() - t1, 1)
        shot = browser.shot("03-seg-on-ct.png")
        where = _to_page(page, [p.world for p in probes])
        samples = []
        for probe, (x, y) in zip(probes, where, strict=True):
            rgb = _colour_at(shot, x, y)
            samples.append({"probe": probe.name, "page_xy": [round(x), round(y)],
                            "rgb": [round(v) for v in rgb], "expect": probe.expect})
        report["samples"] = samples
        for probe, sample in zip(probes, samples, strict=True):
            rgb = np.array(sample["rgb"], dtype=float)
            if probe.expect is None:  # grey CT, no overlay
                assert _chroma(rgb) < 6, f"{probe.name} is coloured: {sample}"
                continue
            # over grey CT, a fill of colour c with opacity a leaves rgb - grey = a (c - grey(c))
            tint = rgb - rgb.mean()
            fits = {}
            for n, c in colours.items():
                hue = np.array(c, dtype=float) - np.mean(c)
                fits[n] = (float(np.dot(tint, hue) / np.dot(hue, hue)),  # opacity
                           float(np.dot(tint, hue) / (np.linalg.norm(tint) * np.linalg.norm(hue)
                                                      + 1e-9)))  # same hue: cosine
            sample["fits"] = fits
            number = next(n for n, c in colours.items() if c == probe.expect)
            opacity, cosine = fits[number]
            assert 0.25 <= opacity <= 1.0 and cosine > 0.95, \
                f"{probe.name} lacks its segment's colour: {sample}"
            assert all(fits[n][1] < cosine for n in fits if n != number), \
                f"{probe.name} looks like another segment: {sample}"

        # -- the SR: no error, each finding's measurement text on the page
        t2 = time.monotonic()
        _open_series(page, "SR", page.get_by_text(expected[0].text_lines()[0], exact=True),
                     report, nudge=("stepping through the findings with the viewport's arrows",
                                    lambda: _step_through_findings(page)))
        shown = []
        for n, m in enumerate(expected):
            if n:
                page.locator('[data-cy="viewport-action-arrows-right"]').first.click()
            for line in m.text_lines():
                page.get_by_text(line, exact=True).first.wait_for(timeout=STEP_TIMEOUT_MS)
            # the first line (the volume) lies inside the viewport, readable on screen
            box = page.get_by_text(m.text_lines()[0], exact=True).first.bounding_box()
            view = page.evaluate(f"() => {{ const r = {_VIEWPORT}.canvas.getBoundingClientRect();"
                                 " return [r.x, r.y, r.width, r.height]; }")
            assert box is not None and view[0] <= box["x"] and view[1] <= box["y"] and \
                box["x"] + box["width"] <= view[0] + view[2] and \
                box["y"] + box["height"] <= view[1] + view[3], (m.text_lines()[0], box, view)
            # text boxes on this image do not cover each other
            boxes = [b for b in (e.bounding_box() for e in
                                 page.get_by_text(re.compile(r"^Volume: ")).all()) if b]
            for a, b in itertools.combinations(boxes, 2):
                assert a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"] or \
                    a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"], \
                    f"two findings' text overlaps: {a} {b}"
            time.sleep(1.0)
            browser.shot(f"{4 + n:02d}-sr-{m.tracking_identifier.split(' (')[0].replace(' ', '-')}.png")
            shown.append({"finding": m.tracking_identifier, "lines": m.text_lines()})
        timings["SR findings shown"] = round(time.monotonic() - t2, 1)
        report["sr"] = shown
        assert page.get_by_text("Something went wrong").count() == 0
        errors = browser.all_errors()
        report["errors"] = errors
        assert not errors, "errors in the page:\n" + "\n".join(errors)
        assert not browser.blocked, f"the page tried to reach other hosts: {browser.blocked}"
        failed = False
    finally:
        if failed:  # what the page looked like when the test gave up
            try:
                browser.shot("failure.png")
                report["annotations"] = page.evaluate(_ANNOTATIONS)
            except Exception as exc:  # the page itself may be gone
                report["failure_screenshot"] = repr(exc)
        report["timings_s"] = timings
        report["screenshots"] = [p.name for p in browser.shots]
        report["console_tail"] = browser.console[-40:]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
        browser.close()
