"""WADO-RS frames in the transfer syntax the client accepts (PS3.18 8.7.3.5), and
``/rendered`` and ``/thumbnail`` of instances, series and studies (PS3.18 10.4.1.1.3-4):
windowed as the data set says, bounded for huge images, and a clear 4xx for what cannot
be rendered. Real compressed data from ../shared, served by a real DICOMweb application
on loopback."""

from __future__ import annotations

import io
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from conftest import make_series, shared
from PIL import Image

from dicomnode.config import parse_config
from dicomnode.core.index import Index
from dicomnode.http import make_app
from dicomnode.ingest.spool import Spool
from dicomnode.web.server import serve_in_thread

OCTET_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
JPEG_LS = "1.2.840.10008.1.2.4.80"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Web:
    def __init__(self, root: Path) -> None:
        spool = Spool(root)
        self.index = Index(Index.path_for(root))
        self.handle = serve_in_thread(
            make_app(parse_config({"storage": str(root)}), spool, self.index),
            "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.handle.port}/dicom-web"

    def store(self, *paths: Path) -> list[str]:
        """STOW-RS the files; returns each one's instance URL path."""
        from dicomweb_client.api import DICOMwebClient

        datasets = [pydicom.dcmread(p) for p in paths]
        result = DICOMwebClient(self.url).store_instances(datasets)
        assert not result.get("FailedSOPSequence"), result
        return [f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/"
                f"{d.SOPInstanceUID}" for d in datasets]

    def get(self, path: str, media: str | None = None, **params: Any) -> httpx.Response:
        """GET with ``media`` as the Accept header (None: httpx's */*)."""
        headers = {"Accept": media} if media is not None else {}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=60)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    w = Web(tmp_path / "storage")
    yield w
    w.handle.stop()
    w.index.close()


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response."""
    ctype = response.headers["content-type"]
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        part_type = next(line.split(b":", 1)[1].strip().decode()
                         for line in head.split(b"\r\n") if line.lower().startswith(
                             b"content-type"))
        out.append((part_type, body[:-2]))
    return out


def _frame_bytes(path: Path, index: int) -> bytes:
    """A frame decoded by pydicom, as little-endian native bytes."""
    arr = pydicom.dcmread(path).pixel_array
    frame = arr[index] if arr.ndim == 3 else arr
    return frame.astype(frame.dtype.newbyteorder("<")).tobytes()


# -- frames ----------------------------------------------------------------------------------


def test_frames_in_the_accepted_transfer_syntax(web: Web) -> None:
    nema = shared("nema-wg04-compression-samples")
    stored = nema / "JLSL" / "CT1_JLSL.dcm"
    [url] = web.store(stored)
    reference = _frame_bytes(nema / "REF" / "CT1_UNC.dcm", 0)

    # transfer-syntax=*: the stored JPEG-LS bitstream, and the response says so
    r = web.get(url + "/frames/1", OCTET_ANY)
    assert r.status_code == 200
    assert f"transfer-syntax={JPEG_LS}" in r.headers["content-type"]
    [(ctype, data)] = _parts(r)
    assert ctype == f"application/octet-stream; transfer-syntax={JPEG_LS}"
    from pydicom.encaps import get_frame

    assert data == get_frame(pydicom.dcmread(stored).PixelData, 0, number_of_frames=1)

    # anything goes (*/*): as stored
    r = web.get(url + "/frames/1", "*/*")
    assert f"transfer-syntax={JPEG_LS}" in r.headers["content-type"]
    # uncompressed asked for (octet-stream without a syntax or with Explicit VR Little
    # Endian, or no preference at all): decoded
    for accept in ('multipart/related; type="application/octet-stream"',
                   f'multipart/related; type="application/octet-stream"; '
                   f"transfer-syntax={EXPLICIT_LE}", "application/octet-stream", ""):
        r = web.get(url + "/frames/1", accept)
        assert r.status_code == 200 and f"transfer-syntax={EXPLICIT_LE}" in \
            r.headers["content-type"]
        assert _parts(r)[0][1] == reference  # JPEG-LS lossless: exactly the reference
    # and the ways dicomweb-client asks: type="*/*" by default (as stored), or
    # application/octet-stream (uncompressed)
    from dicomweb_client.api import DICOMwebClient

    study, _, series, _, sop = url.split("/")[2:7]
    dw = DICOMwebClient(web.url)
    assert dw.retrieve_instance_frames(study, series, sop, [1])[0] == data
    assert dw.retrieve_instance_frames(study, series, sop, [1], media_types=(
        "application/octet-stream",))[0] == reference

    # the compressed media type itself, with or without its syntax
    r = web.get(url + "/frames/1", 'multipart/related; type="image/jls"')
    assert r.status_code == 200 and _parts(r)[0] == (f"image/jls; transfer-syntax={JPEG_LS}",
                                                     data)
    # what the node cannot make: another compression
    for accept in ('multipart/related; type="image/jp2"',
                   'multipart/related; type="application/octet-stream"; '
                   "transfer-syntax=1.2.840.10008.1.2.4.90"):
        r = web.get(url + "/frames/1", accept)
        assert r.status_code == 406 and JPEG_LS in r.text
    # preferences: q-values pick the acceptable one
    r = web.get(url + "/frames/1", 'multipart/related; type="image/jp2", '
                                   'multipart/related; type="image/jls"; q=0.5')
    assert r.status_code == 200 and _parts(r)[0][0].startswith("image/jls")


def test_multiframe_compressed_and_big_endian_frames(web: Web, tmp_path: Path) -> None:
    folder = shared("pydicom-test-files", "transfer-syntaxes")
    reference = folder / "emri_small.dcm"
    # the samples share their SOP Instance UID: the big endian one gets its own
    ds = pydicom.dcmread(folder / "emri_small_big_endian.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "big.dcm")
    assert pydicom.dcmread(tmp_path / "big.dcm").file_meta.TransferSyntaxUID == \
        "1.2.840.10008.1.2.2"
    jls, big = web.store(folder / "emri_small_jpeg_ls_lossless.dcm", tmp_path / "big.dcm")
    r = web.get(jls + "/frames/2,5", 'multipart/related; type="application/octet-stream"')
    assert [d for _, d in _parts(r)] == [_frame_bytes(reference, 1), _frame_bytes(reference, 4)]
    for accept in (None, OCTET_ANY):  # big endian is served little endian either way
        r = web.get(big + "/frames/3", accept)
        assert r.status_code == 200 and f"transfer-syntax={EXPLICIT_LE}" in \
            r.headers["content-type"]
        assert _parts(r)[0][1] == _frame_bytes(reference, 2)


def test_frame_lists_out_of_range_or_malformed(web: Web, tmp_path: Path) -> None:
    [url] = web.store(make_series(tmp_path / "ct", n=1, size=16)[0])
    assert web.get(url + "/frames/2").status_code == 404
    assert web.get(url + "/frames/0").status_code == 404
    assert web.get(url + "/frames/1,2").status_code == 404
    assert web.get(url + "/frames/x").status_code == 400
    assert web.get(url + "/frames/,").status_code == 400
    [sr] = web.store(shared("dcmqi-test-data", "sr-tid1500-qin-headneck") / "sr.dcm")
    assert web.get(sr + "/frames/1").status_code == 404


# -- rendered and thumbnails ----------------------------------------------------------------


def _image(r: httpx.Response, media: str = "image/jpeg") -> Image.Image:
    assert r.status_code == 200, (r.status_code, r.text[:200])
    assert r.headers["content-type"] == media
    image = Image.open(io.BytesIO(r.content))
    image.load()
    assert image.format == media.split("/")[1].upper()
    return image


def test_rendered_windows_as_asked_and_as_the_dataset_says(web: Web, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=3, size=64)
    urls = web.store(*files)
    ds = pydicom.dcmread(files[0])
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    def linear(center: float, width: float) -> np.ndarray:  # PS3.3 C.11.2.1.2.1
        return np.clip(((hu - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255).astype(
            np.uint8)

    png = np.asarray(_image(web.get(urls[0] + "/rendered", "image/png", window="40,400"),
                            "image/png"))
    assert png.shape == (64, 64) and np.array_equal(png, linear(40, 400))
    lung = np.asarray(_image(web.get(urls[0] + "/rendered", "image/png",
                                     window="-600,1500,linear"), "image/png"))
    assert np.array_equal(lung, linear(-600, 1500))
    # the data set's own window by default, when it has one
    ds.WindowCenter, ds.WindowWidth = 300, 1200
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    windowed = tmp_path / "windowed.dcm"
    ds.save_as(windowed, enforce_file_format=True)
    [url] = web.store(windowed)
    own = np.asarray(_image(web.get(url + "/rendered", "image/png"), "image/png"))
    assert np.array_equal(own, linear(300, 1200))
    # JPEG by default; the accept query parameter wins over the header
    _image(web.get(urls[0] + "/rendered", "*/*"))
    _image(web.get(urls[0] + "/rendered", "image/jpeg", accept="image/png"), "image/png")
    small = _image(web.get(urls[0] + "/rendered", viewport="32,20"))
    assert small.size == (20, 20)


def test_thumbnails_and_rendered_series_and_studies(web: Web, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=5, size=300)
    urls = web.store(*files)
    study = urls[0].split("/series/")[0]
    series = urls[0].split("/instances/")[0]
    for path in (study, series, urls[2]):
        thumb = _image(web.get(path + "/thumbnail"))
        assert max(thumb.size) <= 256 and thumb.size[0] == thumb.size[1]
    assert _image(web.get(study + "/thumbnail", viewport="64,64")).size == (64, 64)
    r = web.get(series + "/rendered", "image/png")
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    parts = _parts(r)
    assert len(parts) == 5 and all(t == "image/png" for t, _ in parts)
    assert Image.open(io.BytesIO(parts[0][1])).size == (300, 300)
    frames = shared("pydicom-test-files", "transfer-syntaxes") / "emri_small_RLE.dcm"
    [mf] = web.store(frames)
    assert _image(web.get(mf + "/frames/4/rendered")).size == (64, 64)
    assert web.get(mf + "/frames/11/rendered").status_code == 404
    assert len(_parts(web.get(mf + "/rendered"))) == 10


def test_what_cannot_be_rendered_is_a_clear_4xx(web: Web, tmp_path: Path) -> None:
    [sr] = web.store(shared("dcmqi-test-data", "sr-tid1500-qin-headneck") / "sr.dcm")
    r = web.get(sr + "/rendered")
    assert r.status_code == 406 and "no pixel data" in r.text
    assert web.get(sr.split("/instances/")[0] + "/thumbnail").status_code == 406
    [ct] = web.store(make_series(tmp_path / "ct", n=1, size=16)[0])
    for params in ({"viewport": "abc"}, {"viewport": "0,10"}, {"quality": "0"},
                   {"quality": "high"}, {"window": "40"}, {"window": "40,0"},
                   {"window": "40,400,sigmoid-ish"}):
        r = web.get(ct + "/rendered", **params)
        assert r.status_code == 400, (params, r.status_code)
    assert web.get(ct + "/rendered", "text/html").status_code == 406
    assert web.get(ct + "/rendered", "image/gif, application/pdf").status_code == 406
    assert web.get(ct + "/frames/2/rendered").status_code == 404
    assert web.get("/studies/1.2.3/thumbnail").status_code == 404


def test_huge_images_are_refused_or_read_sparsely(web: Web, tmp_path: Path) -> None:
    """Headers announcing 65535x65535 or 46341x46341 pixels over a few bytes are refused
    before anything is allocated; a real 6000x6000 image is rendered from every n-th row
    and column, in bounded memory."""
    edge = shared("orthanc-tests", "malformed-and-edge-cases")
    for name in ("2026-05-26-oob-monochrome-65535.dcm", "2026-05-26-oob-monochrome-46341.dcm"):
        [url] = web.store(edge / name)
        assert web.get(url + "/rendered").status_code == 413
        assert web.get(url + "/thumbnail").status_code == 413
        assert web.get(url + "/frames/1").status_code == 400  # shorter than announced
    ds = pydicom.dcmread(make_series(tmp_path / "ct", n=1, size=16)[0])
    big = np.zeros((6000, 6000), dtype=np.uint16)
    big[1000:5000, 1000:5000] = 1024 + 400
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    del big
    [url] = web.store(path)
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        thumb = _image(web.get(url + "/thumbnail", "image/png", window="0,800"), "image/png")
        seconds = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert thumb.size == (256, 256)
    pixels = np.asarray(thumb)
    assert pixels[128, 128] == 255 and pixels[5, 5] == 0  # the bright square, the dark frame
    print(f"huge thumbnail: {seconds:.2f} s, {peak / 1e6:.1f} MB traced")
    assert peak < 16 << 20, f"{peak / 1e6:.1f} MB traced for a 72 MB image"
    assert seconds < 20
