"""DICOMweb: STOW-RS in, QIDO-RS and WADO-RS out, bearer tokens, hostile multipart."""

from __future__ import annotations

import io
import json
import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import dicom_files, make_series, shared, uids
from orthanc import orthanc  # noqa: F401

from dicomnode.config import parse_config
from dicomnode.core.index import Index
from dicomnode.http import make_app
from dicomnode.ingest.multipart import (
    MultipartError,
    MultipartParser,
    boundary_from,
    parse_content_type,
)
from dicomnode.ingest.spool import Spool
from dicomnode.web.auth import hash_token
from dicomnode.web.server import serve_in_thread

TOKEN = "s3cret-token-for-tests"


class Node:
    """Spool + index + DICOMweb app served by uvicorn on a free loopback port."""

    def __init__(self, root: Path, tokens: dict[str, str] | None = None, **kw: Any) -> None:
        self.config = parse_config({"ae_title": "DICOMNODE", "storage": str(root)})
        self.spool = Spool(root)
        self.index = Index(Index.path_for(root))
        self.app = make_app(self.config, self.spool, self.index, tokens=tokens, **kw)
        self.handle = serve_in_thread(self.app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.handle.port}/dicom-web"

    def stop(self) -> None:
        self.handle.stop()
        self.index.close()

    def tmp_files(self) -> list[Path]:
        return list(self.spool.tmp.iterdir())


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "storage")
    yield n
    n.stop()


@pytest.fixture
def web_auth(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "storage", tokens={"pacs": hash_token(TOKEN)})
    yield n
    n.stop()


def multipart(parts: list[tuple[bytes, str]], boundary: str = "b0undary") -> bytes:
    out = io.BytesIO()
    for data, ctype in parts:
        out.write(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def stow(url: str, body: bytes, boundary: str = "b0undary",
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
         "Accept": "application/dicom+json", **(headers or {})}
    return httpx.post(url + "/studies", content=body, headers=h, timeout=60)


def client(url: str, token: str | None = None) -> Any:
    from dicomweb_client.api import DICOMwebClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url, headers=headers)


# -- multipart parser (unit) -----------------------------------------------------------


def parse_all(body: bytes, folder: Path, chunk: int = 7, **kw: Any) -> list[tuple[dict, bytes]]:
    parser = MultipartParser("b0undary", folder, **kw)
    out = []
    for i in range(0, len(body), chunk):
        for part in parser.feed(body[i : i + chunk]):
            out.append((part.headers, part.path.read_bytes()))
            part.discard()
    parser.finish()
    return out


def test_parser_roundtrip_any_chunking(tmp_path: Path) -> None:
    rng = random.Random(1)
    payloads = [b"", b"x", b"\r\n--b0undar", rng.randbytes(5000), b"--b0undary" + b"y" * 3]
    body = b"preamble\r\n" + multipart([(p, "application/dicom") for p in payloads])
    for chunk in (1, 2, 3, 7, 64, 4096, len(body)):
        got = parse_all(body, tmp_path, chunk)
        assert [d for _, d in got] == payloads
        assert all(h["content-type"] == "application/dicom" for h, _ in got)
    assert list(tmp_path.iterdir()) == []


def test_parser_content_type() -> None:
    assert boundary_from('multipart/related; type="application/dicom"; boundary="a b"') == "a b"
    assert boundary_from("Multipart/Related; boundary=xyz; type=application/dicom") == "xyz"
    assert parse_content_type("application/dicom; transfer-syntax=1.2.840.10008.1.2.1") == (
        "application/dicom", {"transfer-syntax": "1.2.840.10008.1.2.1"})
    with pytest.raises(MultipartError) as e:
        boundary_from("application/json")
    assert e.value.status == 415
    with pytest.raises(MultipartError):
        boundary_from("multipart/related; type=application/dicom")


@pytest.mark.parametrize("body", [
    b"",
    b"garbage without any boundary",
    b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nunterminated body",
    b"--b0undary\r\nno-colon-header\r\n\r\nx\r\n--b0undary--",
    b"--b0undaryXX\r\n\r\nx\r\n--b0undary--",
    b"--b0undary\r\n" + b"H: " + b"v" * 20000 + b"\r\n\r\nx\r\n--b0undary--",
])
def test_parser_malformed(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_all(body, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_parser_limits(tmp_path: Path) -> None:
    body = multipart([(b"a" * 100, "application/dicom")] * 3)
    with pytest.raises(MultipartError) as e:
        parse_all(body, tmp_path, max_part_bytes=50)
    assert e.value.status == 413
    with pytest.raises(MultipartError) as e:
        parse_all(body, tmp_path, max_parts=2)
    assert e.value.status == 413
    assert list(tmp_path.iterdir()) == []


def test_parser_random_input_never_crashes(tmp_path: Path) -> None:
    """A cheap fuzz: mutated and random bodies end in parts or MultipartError, nothing else."""
    rng = random.Random(42)
    base = multipart([(rng.randbytes(300), "application/dicom") for _ in range(3)])
    deadline = time.monotonic() + 5
    n = 0
    while time.monotonic() < deadline and n < 3000:
        n += 1
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                del data[pos : pos + rng.randint(1, 20)]
            elif op < 0.8:
                data[pos:pos] = rng.choice([b"\r\n", b"--", b"--b0undary", b"\r\n\r\n",
                                            rng.randbytes(5)])
            else:
                data = data[:pos]
        try:
            parse_all(bytes(data), tmp_path, chunk=rng.randint(1, 500), max_part_bytes=10_000)
        except MultipartError:
            pass
    assert list(tmp_path.iterdir()) == []


# -- STOW-RS / QIDO-RS / WADO-RS with dicomweb-client ----------------------------------------


def _roundtrip(web: Node, files: list[Path]) -> None:
    dw = client(web.url)
    datasets = [pydicom.dcmread(f) for f in files]
    result = dw.store_instances(datasets)
    assert not result.get("FailedSOPSequence")
    assert len(result.ReferencedSOPSequence) == len(files)

    study = uids(files[0])[0]
    # the index has the rows; files are byte-identical to what was sent
    rows = web.index.query("SELECT * FROM instances WHERE study_uid = ?", (study,))
    assert len(rows) == len(files)
    assert {r["calling_ae"] for r in rows} == {"STOW-RS"}
    assert {r["called_ae"] for r in rows} == {"DICOMNODE"}
    for ds in datasets:
        _, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        stored = web.spool.instance_path(study, series, sop).read_bytes()
        sent = io.BytesIO()
        ds.save_as(sent, enforce_file_format=True)
        assert stored == sent.getvalue()
    assert web.tmp_files() == []

    # QIDO
    studies = dw.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(studies) == 1
    assert studies[0]["00201208"]["Value"] == [len(files)]
    assert studies[0]["00080061"]["Value"] == ["CT"]
    series_list = dw.search_for_series(study)
    assert {s["0020000E"]["Value"][0] for s in series_list} == {r["series_uid"] for r in rows}
    series = series_list[0]["0020000E"]["Value"][0]
    insts = dw.search_for_instances(study, series)
    assert {i["00080018"]["Value"][0] for i in insts} == {
        r["sop_instance_uid"] for r in rows if r["series_uid"] == series}
    assert dw.search_for_studies(search_filters={"PatientID": "no-such-patient"}) == []

    # WADO: instances identical to the stored files, metadata readable by pydicom
    row = rows[0]
    stored_path = web.spool.root / row["path"]
    got = dw.retrieve_instance(study, row["series_uid"], row["sop_instance_uid"])
    buf = io.BytesIO()
    got.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == stored_path.read_bytes()
    raw = httpx.get(f"{web.url}/studies/{study}/series/{row['series_uid']}/instances/"
                    f"{row['sop_instance_uid']}")
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("multipart/related")
    assert stored_path.read_bytes() in raw.content
    whole = dw.retrieve_study(study)
    assert len(whole) == len(files)

    meta = dw.retrieve_series_metadata(study, row["series_uid"])
    assert len(meta) == sum(1 for r in rows if r["series_uid"] == row["series_uid"])
    m = dw.retrieve_instance_metadata(study, row["series_uid"], row["sop_instance_uid"])
    ds = pydicom.Dataset.from_json(m)
    assert ds.SOPInstanceUID == row["sop_instance_uid"]
    uri = m["7FE00010"]["BulkDataURI"]
    assert uri.startswith(web.url + "/studies/")
    ref = pydicom.dcmread(stored_path)
    frame = dw.retrieve_instance_frames(study, row["series_uid"], row["sop_instance_uid"], [1])
    assert frame[0] == ref.PixelData[: int(ref.Rows) * int(ref.Columns) * ref.BitsAllocated // 8]
    bulk = dw.retrieve_bulkdata(uri)
    assert bulk[0] == ref.PixelData


def test_stow_qido_wado_synthetic(web: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=6, size=32)
    _roundtrip(web, files)


def test_stow_qido_wado_real_chest_ct(web: Node) -> None:
    files = dicom_files(shared("tcia-lung-pet-ct-dx"))[:20]
    _roundtrip(web, files)


def test_duplicates_are_success_and_study_mismatch_fails(web: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=2, size=16)
    body = multipart([(f.read_bytes(), "application/dicom") for f in files])
    assert stow(web.url, body).status_code == 200
    r = stow(web.url, body)
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 2
    other = "1.2.3.4.5"
    r = httpx.post(f"{web.url}/studies/{other}", content=body, headers={
        "Content-Type": "multipart/related; type=\"application/dicom\"; boundary=b0undary"})
    assert r.status_code == 409
    assert [f["00081197"]["Value"][0] for f in r.json()["00081198"]["Value"]] == [0xA900] * 2


# -- hostile input ---------------------------------------------------------------------------


def test_hostile_stow_requests(web: Node, tmp_path: Path) -> None:
    good = make_series(tmp_path / "ct", n=1, size=16)[0]
    # path traversal in the SOP Instance UID of the file meta
    ds = pydicom.dcmread(good)
    ds.file_meta.MediaStorageSOPInstanceUID = "../../../etc/passwd"
    ds.SOPInstanceUID = "1.2.3"
    evil = io.BytesIO()
    ds.save_as(evil)
    # ... and in the Study Instance UID of the dataset
    ds2 = pydicom.dcmread(good)
    ds2.StudyInstanceUID = "1.2/../../x"
    evil2 = io.BytesIO()
    ds2.save_as(evil2)
    body = multipart([
        (good.read_bytes(), "application/dicom"),
        (b"this is not DICOM at all", "application/dicom"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 100, "application/dicom"),
        (evil.getvalue(), "application/dicom"),
        (evil2.getvalue(), "application/dicom"),
        (b"{}", "application/json"),
    ])
    r = stow(web.url, body)
    assert r.status_code == 202, r.text
    js = r.json()
    assert len(js["00081199"]["Value"]) == 1
    reasons = [f["00081197"]["Value"][0] for f in js["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000, 0xC000, 0xC000, 0x0122]
    assert "passwd" not in r.text
    for p in web.spool.root.rglob("*"):
        assert p.resolve().is_relative_to(web.spool.root.resolve())
    assert not (web.spool.root.parent / "x").exists()

    # malformed multipart, wrong content type, garbage, truncated body
    assert stow(web.url, b"no boundary here").status_code == 400
    assert stow(web.url, good.read_bytes()[:1000]).status_code == 400
    trunc = multipart([(good.read_bytes(), "application/dicom")])[:-40]
    assert stow(web.url, trunc).status_code == 400
    r = httpx.post(web.url + "/studies", content=b"{}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    r = httpx.post(web.url + "/studies", content=b"x", headers={
        "Content-Type": "multipart/related; boundary=" + "x" * 300})
    assert r.status_code == 400
    # bad UIDs in paths
    assert httpx.get(web.url + "/studies/..%2F..%2Fetc/series").status_code in (400, 404)
    assert httpx.get(web.url + "/studies/1.2.3/series/abc/metadata").status_code == 404
    assert httpx.get(web.url + "/studies/1.2.3").status_code == 404
    assert httpx.get(web.url + "/studies/1.2.3/series/1.2/instances/1.3/frames/x").status_code in (
        400, 404)
    # the server stays up, nothing partial is left
    assert httpx.get(web.url + "/studies").status_code in (200, 204)
    assert web.tmp_files() == []
    assert web.index.query("SELECT count(*) AS n FROM instances")[0]["n"] == 1


def test_request_too_large(tmp_path: Path) -> None:
    from dicomnode.ingest.stow import StowLimits as WebLimits

    n = Node(tmp_path / "storage", limits=WebLimits(max_request_bytes=10_000,
                                                    max_part_bytes=5_000, max_parts=3))
    try:
        files = make_series(tmp_path / "ct", n=1, size=128)
        body = multipart([(files[0].read_bytes(), "application/dicom")])
        assert stow(n.url, body).status_code == 413
        small = make_series(tmp_path / "ct2", n=4, size=8)
        body = multipart([(f.read_bytes(), "application/dicom") for f in small])
        r = stow(n.url, body)
        # too many parts: refused whole (413), or, when parts were already stored as
        # they streamed in, those are reported with a failure for the rest (202)
        assert r.status_code in (413, 202)
        if r.status_code == 202:
            assert len(r.json()["00081199"]["Value"]) <= 3
        assert stow(n.url, multipart([(f.read_bytes(), "application/dicom")
                                      for f in small[:3]])).status_code == 200
        assert n.tmp_files() == []
    finally:
        n.stop()


# -- authentication ----------------------------------------------------------------------------


def test_bearer_tokens(web_auth: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=3, size=16)
    body = multipart([(f.read_bytes(), "application/dicom") for f in files])
    no = stow(web_auth.url, body)
    wrong = stow(web_auth.url, body, headers={"Authorization": "Bearer not-the-token"})
    unknown = httpx.get(web_auth.url + "/no/such/path")
    basic = httpx.get(web_auth.url + "/studies", headers={"Authorization": "Basic eDp5"})
    for r in (no, wrong, unknown, basic):
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.content == no.content
    assert web_auth.index.query("SELECT count(*) AS n FROM instances")[0]["n"] == 0
    assert web_auth.tmp_files() == []
    ok = stow(web_auth.url, body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    dw = client(web_auth.url, TOKEN)
    assert len(dw.search_for_instances(uids(files[0])[0])) == 3
    got = dw.retrieve_instance(*uids(files[0]))
    buf = io.BytesIO()
    got.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == files[0].read_bytes()


# -- memory stays bounded ------------------------------------------------------------------------


def test_large_upload_streams(web: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=200, size=256)  # ~26 MB
    boundary = "bigb0undary"

    def body() -> Iterator[bytes]:
        for f in files:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield f.read_bytes()
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    total = sum(f.stat().st_size for f in files)
    tracemalloc.start()
    try:
        r = httpx.post(web.url + "/studies", content=body(), timeout=120, headers={
            "Content-Type": f"multipart/related; type=\"application/dicom\"; boundary={boundary}"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text[:500]
    assert len(r.json()["00081199"]["Value"]) == 200
    # the server (same process) never held the upload: peak well under its size
    assert peak < total / 2, (peak, total)
    assert web.tmp_files() == []


# -- Orthanc sends a study by STOW-RS ---------------------------------------------------------------


def test_orthanc_stow_to_node(orthanc: Any, web_auth: Node, tmp_path: Path) -> None:  # noqa: F811
    if not orthanc.has_dicomweb:
        pytest.skip("Orthanc DICOMweb plugin not installed")
    files = make_series(tmp_path / "ct", n=5, size=32)
    for f in files:
        orthanc.upload(f)
    study_uid = uids(files[0])[0]
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    assert len(found) == 1
    orthanc.request("PUT", "/dicom-web/servers/NODE", json.dumps({
        "Url": web_auth.url, "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
    }).encode())
    answer = orthanc.post("/dicom-web/servers/NODE/stow", {"Resources": found, "Synchronous": True})
    rows = web_auth.index.query("SELECT * FROM instances WHERE study_uid = ?", (study_uid,))
    assert len(rows) == 5, answer
    for f in files:
        _, series, sop = uids(f)
        stored = web_auth.spool.instance_path(study_uid, series, sop)
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData
    # and Orthanc's DICOMweb client reads them back through QIDO-RS
    qido = orthanc.post("/dicom-web/servers/NODE/get", {"Uri": f"/studies/{study_uid}/series"})
    assert uids(files[0])[1] in json.dumps(qido)
    assert web_auth.tmp_files() == []



