"""The status page at ``/``: studies, jobs, deliveries, result overlays and measurements,
under the same authentication as DICOMweb (bearer token, or the /login session cookie),
never a patient identifier to a caller DICOMweb would refuse.

The first test builds the node's HTTP application in process over a real index, job
queue and outbox (a job that failed, a delivery a PACS refused); the second runs a real
node with the lung model on the shared chest CT and checks the overlay's colours fall
on the lungs and the measurements on the page are the model's.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from conftest import ROOT, dicom_files, free_port, make_series, shared, storescu
from PIL import Image
from scipy import ndimage

from dicomnode.config import parse_config
from dicomnode.core.index import Index
from dicomnode.export.outbox import Outbox
from dicomnode.http import build_app
from dicomnode.ingest.spool import Spool
from dicomnode.metrics import Metrics
from dicomnode.queue.sqlite import SQLiteJobQueue
from dicomnode.web.auth import hash_token
from dicomnode.web.server import serve_in_thread

TOKEN = "status-page-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PATIENT = ("PAGE^PATIENT", "PID-PAGE-1")


class App:
    """The node's whole HTTP application (tokens on) over real stores, on loopback."""

    def __init__(self, root: Path) -> None:
        self.config = parse_config({
            "storage": str(root), "models_dir": str(ROOT / "models"),
            "http": {"tokens": [{"name": "tests", "sha256": hash_token(TOKEN)}]}})
        self.spool = Spool(root)
        self.index = Index(Index.path_for(root))
        self.queue = SQLiteJobQueue(SQLiteJobQueue.path_for(root))
        self.outbox = Outbox(root)
        app = build_app(self.config, self.spool, self.index, Metrics(index=self.index), [],
                        scheduler=lambda: None, queue=self.queue, outbox=self.outbox)
        self.handle = serve_in_thread(app, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.handle.port}"

    def stop(self) -> None:
        self.handle.stop()
        self.outbox.close()
        self.queue.close()
        self.index.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = App(tmp_path / "storage")
    yield a
    a.stop()


def _no_patient_data(text: str) -> None:
    for needle in (*PATIENT, "PAGE, PATIENT", "PAGE"):
        assert needle not in text, needle


def _only_own_assets(html: str) -> None:
    """Readable on a phone, nothing fetched from elsewhere, no script."""
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "<script" not in html.lower()
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith(("/", "#")), url


def test_the_page_answers_whom_dicomweb_answers(app: App, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=3, size=32)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ds.PatientName, ds.PatientID = PATIENT
        ds.StudyDescription = "CHEST CT"
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(app.base + "/dicom-web", headers=BEARER).store_instances(datasets)
    study = str(datasets[0].StudyInstanceUID)
    # a job that failed, a delivery a PACS refused: real queue and outbox, real reasons
    app.queue.add("job-key", "lung_density", {"study_uid": study, "revision": 1,
                                              "series_uid": "1.2.3", "rule": "chest"},
                  max_attempts=1)
    [job] = app.queue.acquire("tests", 60)
    app.queue.release(job.id, "tests", error="ValueError: 3 slices; the model needs 20")
    stored = app.index.instances(study_uid=study)[0]
    [delivery] = app.outbox.enqueue("pacs", [app.spool.root / stored.path], key="job-key")
    app.outbox.mark_failed(delivery.id, "permanent", "association rejected: unknown AE <PACS>")

    # no token: the sign-in page, and nothing about the patient anywhere
    r = httpx.get(app.base + "/")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/"
    _no_patient_data(r.text)
    login = httpx.get(app.base + "/", follow_redirects=True)
    assert login.status_code == 200 and 'name="token"' in login.text
    _no_patient_data(login.text)
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Cookie": "dicomnode_session=forged"}):
        r = httpx.get(app.base + "/", headers=headers)
        assert r.status_code == 303
        _no_patient_data(r.text)
    for path in ("/status/jobs/1/overlay.png", f"/dicom-web/studies/{study}/thumbnail"):
        r = httpx.get(app.base + path)
        assert r.status_code == 401
        _no_patient_data(r.text)

    # a bearer token: the page
    page = httpx.get(app.base + "/", headers=BEARER)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    html = page.text
    assert "PAGE, PATIENT" in html and "PID-PAGE-1" in html and "CHEST CT" in html
    assert f'href="/viewer/viewer?StudyInstanceUIDs={study}"' in html
    assert f'src="/dicom-web/studies/{study}/thumbnail?viewport=96,96"' in html
    assert '<meta http-equiv="refresh" content="15">' in html
    job_row = re.search(r'<tr id="job-1">.*?</tr>', html, re.S)
    assert job_row and "failed" in job_row.group(0) and "the model needs 20" in job_row.group(0)
    dest = re.search(r'<tr id="destination-pacs">.*?</tr>', html, re.S)
    assert dest and re.findall(r">(\d+)</span>", dest.group(0)) == ["0", "0", "1"]
    assert "association rejected: unknown AE &lt;PACS&gt;" in html  # escaped
    _only_own_assets(html)

    # a browser: signs in once with the token, then reads the page and the thumbnails
    with httpx.Client(base_url=app.base) as browser:
        r = browser.post("/login", data={"token": TOKEN, "next": "/"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert TOKEN not in r.headers["set-cookie"]
        assert "PID-PAGE-1" in browser.get("/").text
        thumb = browser.get(f"/dicom-web/studies/{study}/thumbnail?viewport=96,96")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 96
        # the cookie reads; it never writes (STOW-RS still needs the bearer token)
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + files[0].read_bytes() + \
            b"\r\n--b--\r\n"
        r = browser.post("/dicom-web/studies", content=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        assert r.status_code == 401
        browser.post("/logout")
        assert browser.get("/").status_code == 303


def test_the_page_without_models_or_destinations(tmp_path: Path) -> None:
    """A node that runs no models and sends nothing says so; no tokens: open, as DICOMweb."""
    root = tmp_path / "storage"
    spool, index = Spool(root), Index(Index.path_for(root))
    app = build_app(parse_config({"storage": str(root)}), spool, index, Metrics(index=index),
                    [], scheduler=lambda: None)
    handle = serve_in_thread(app, "127.0.0.1", 0)
    try:
        html = httpx.get(f"http://127.0.0.1:{handle.port}/").text
        assert "Nothing received yet." in html and "runs no models" in html
        assert "No destinations configured" in html
        assert httpx.get(f"http://127.0.0.1:{handle.port}/status/jobs/1/overlay.png"
                         ).status_code == 404
    finally:
        handle.stop()
        index.close()


# -- a real node, the lung model, the chest CT ---------------------------------------------------


def _colour_pixels(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere(np.all(image == np.asarray(color, dtype=np.uint8), axis=-1))


def test_the_lung_result_on_the_page(node_factory: Any) -> None:
    chest = dicom_files(shared("tcia-lung-pet-ct-dx"))
    node = node_factory({
        "models_dir": str(ROOT / "models"),
        "http": {"tokens": [{"name": "tests", "sha256": hash_token(TOKEN)}]},
        # a PACS that is down: the results wait in the outbox, the page says so
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": free_port(), "objects": ["seg", "sr"]}],
        "export": {"retry_base_seconds": 0.2, "retry_max_seconds": 1},
        "routing": [{"name": "lung", "model": "lung_density", "destinations": ["pacs"],
                     "match": {"modality": ["CT"], "body_part": "chest|lung|thorax"}}],
    }).start(timeout=120)
    assert storescu(node.port, chest).returncode == 0
    jobs = node.wait_for(lambda: [j for j in node.status()["jobs"] if j["state"] == "done"],
                         timeout=300, interval=1.0)
    job = jobs[0]
    base = f"http://127.0.0.1:{node.http_port}"
    head = pydicom.dcmread(chest[0], stop_before_pixels=True)

    r = httpx.get(base + "/", timeout=30)
    assert r.status_code == 303
    assert str(head.PatientID) not in r.text

    html = httpx.get(base + "/", headers=BEARER, timeout=30).text
    assert str(head.StudyInstanceUID) in html and str(head.PatientID) in html
    job_row = re.search(rf'<tr id="job-{job["id"]}">.*?</tr>', html, re.S)
    assert job_row and "done" in job_row.group(0) and "lung_density" in job_row.group(0)
    card = re.search(rf'<div class="result" id="result-{job["id"]}">.*?</table>', html, re.S)
    assert card, html
    measurements = job["result"]["measurements"]
    columns = [re.sub(r" \(.*\)$", "", c) for c in
               re.findall(r'<th class="num">([^<]*)</th>', card.group(0))]
    assert columns[0] == "volume" and sorted(columns) == sorted(measurements["total"])
    for label in ("right lung", "left lung", "total"):
        row = re.search(rf"{label}</td>(.*?)</tr>", card.group(0), re.S)
        assert row, label
        cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
        expected = [f"{float(measurements[label][q][0]):.1f}" for q in columns]
        assert cells == expected, (label, cells, expected)
    total_litres = float(measurements["total"]["volume"][0]) / 1000
    assert 2.0 < total_litres < 8.0
    assert "volume (ml)" in card.group(0)
    dest = re.search(r'<tr id="destination-pacs">.*?</tr>', html, re.S)
    assert dest and sum(int(n) for n in re.findall(r">(\d+)</span>", dest.group(0))) == 2

    # the overlay: contours in each lung's colour, on that lung of the slice shown
    r = httpx.get(f"{base}/status/jobs/{job['id']}/overlay.png", headers=BEARER, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert image.shape == (256, 256, 3)
    labels = np.load(node.storage / job["result"]["labels_path"])["labels"]
    k = int(np.argmax(np.count_nonzero(labels.reshape(labels.shape[0], -1), axis=1)))
    scale = image.shape[0] / labels.shape[1]
    for value, color in ((1, (128, 174, 128)), (2, (241, 214, 145))):
        pixels = _colour_pixels(image, color)
        assert len(pixels) > 100, (value, len(pixels))
        # a 2-pixel line at half scale lies within 3 thumbnail pixels of the lung's edge
        near = ndimage.binary_dilation(labels[k] == value, iterations=6)
        rows = np.clip(((pixels[:, 0] + 0.5) / scale).astype(int), 0, labels.shape[1] - 1)
        cols = np.clip(((pixels[:, 1] + 0.5) / scale).astype(int), 0, labels.shape[2] - 1)
        on_lung = near[rows, cols].mean()
        assert on_lung > 0.99, (value, on_lung)
        # ... and goes round it: it spans the lung's extent in both directions
        lung_rows, lung_cols = np.nonzero(labels[k] == value)
        assert np.ptp(rows) > 0.9 * np.ptp(lung_rows) and np.ptp(cols) > 0.9 * np.ptp(lung_cols)
        other = ndimage.binary_erosion(labels[k] == 3 - value, iterations=2)
        assert not other[rows, cols].any()  # never inside the other lung
    # made once, then served from memory
    t0 = time.monotonic()
    again = httpx.get(f"{base}/status/jobs/{job['id']}/overlay.png", headers=BEARER)
    assert again.content == r.content and time.monotonic() - t0 < 5
    # the study's DICOMweb thumbnail, as the page shows it
    thumb = httpx.get(f"{base}/dicom-web/studies/{head.StudyInstanceUID}/thumbnail",
                      params={"viewport": "96,96"}, headers=BEARER, timeout=60)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
