"""QIDO-RS as OHIF and other clients use it (PS3.18 10.6, PS3.4 C.2.2.2): matching done
in SQL on attributes stored at admission, includefield, paging, and a clear 400 or a
Warning for every key the node cannot apply. A real DICOMweb application on loopback,
driven by dicomweb-client and httpx."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import dicom_files, make_series, shared

from dicomnode.config import parse_config
from dicomnode.core.index import SCHEMA_VERSION, Index
from dicomnode.http import make_app
from dicomnode.ingest.header import read_header
from dicomnode.ingest.reconcile import backfill_attributes
from dicomnode.ingest.spool import Spool
from dicomnode.web.server import serve_in_thread

#: (patient name, patient id, date, time, accession, description, [(modality, n)])
STUDIES = [
    ("DOE^JOHN", "PID-1", "20240105", "083000", "ACC1", "CT CHEST", [("CT", 3)]),
    ("Doe^Jane^^^", "pid-2", "20240210", "101500.25", "ACC2", "Chest CT follow-up",
     [("CT", 2), ("MR", 2)]),
    ("SMITH^ANNA", "PID-3", "20240315", "140000", "ACC3", "CT ABDOMEN", [("CT", 2)]),
    ("MÜLLER^JÜRGEN", "PID-4", "20240420", "230000", "ACC4", "PET CT", [("PT", 2)]),
]


class Web:
    """Spool + index + the DICOMweb application on a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool(root)
        self.index = Index(Index.path_for(root))
        self.handle = serve_in_thread(
            make_app(parse_config({"storage": str(root)}), self.spool, self.index),
            "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.handle.port}/dicom-web"

    def stop(self) -> None:
        self.handle.stop()
        self.index.close()

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=30)


def _studies(folder: Path) -> list[dict[str, Any]]:
    """The test studies as datasets, with their UIDs."""
    out = []
    for n, (name, pid, day, tm, acc, desc, series) in enumerate(STUDIES):
        study_uid = pydicom.uid.generate_uid()
        datasets = []
        for s, (modality, count) in enumerate(series):
            for f in make_series(folder / f"{n}-{s}", n=count, size=16,
                                 study_uid=study_uid, series_number=s + 1):
                ds = pydicom.dcmread(f)
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = name, pid, day, tm
                ds.AccessionNumber, ds.StudyDescription, ds.Modality = acc, desc, modality
                ds.SeriesDescription = f"{modality} series {s + 1}"
                datasets.append(ds)
        out.append({"uid": study_uid, "datasets": datasets})
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Web, list[dict[str, Any]]]]:
    from dicomweb_client.api import DICOMwebClient

    tmp = tmp_path_factory.mktemp("qido")
    web = Web(tmp / "storage")
    studies = _studies(tmp / "src")
    client = DICOMwebClient(web.url)
    for study in studies:  # one request per study: arrival order is the list's
        assert not client.store_instances(study["datasets"]).get("FailedSOPSequence")
    yield web, studies
    web.stop()


def _client(web: Web) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(web.url)


def _uids(items: list[dict[str, Any]], tag: str = "0020000D") -> list[str]:
    return [i[tag]["Value"][0] for i in items]


def _names(items: list[dict[str, Any]]) -> list[str]:
    """Patient names as answered (trailing empty components, as stored, left out)."""
    return [i["00100010"]["Value"][0]["Alphabetic"].rstrip("^") for i in items]


def test_patient_name_wildcards_are_case_insensitive(node: Any) -> None:
    web, studies = node
    dw = _client(web)
    assert _names(dw.search_for_studies(search_filters={"PatientName": "doe*"})) == [
        "DOE^JOHN", "Doe^Jane"]
    assert _names(dw.search_for_studies(search_filters={"PatientName": "D?E^JA*"})) == [
        "Doe^Jane"]
    # single value matching ignores case and trailing empty components
    assert _names(dw.search_for_studies(search_filters={"PatientName": "doe^jane"})) == [
        "Doe^Jane"]
    assert dw.search_for_studies(search_filters={"PatientName": "doe"}) == []
    # non-ASCII names, decoded with the data set's character set
    assert _names(dw.search_for_studies(search_filters={"PatientName": "müller*"})) == [
        "MÜLLER^JÜRGEN"]
    assert _names(dw.search_for_studies(search_filters={"00100010": "*ANNA"})) == [
        "SMITH^ANNA"]


def test_ids_dates_times_modalities_and_descriptions(node: Any) -> None:
    web, studies = node
    dw = _client(web)
    uid = [s["uid"] for s in studies]

    def find(**filters: Any) -> list[str]:
        return _uids(dw.search_for_studies(search_filters=filters))

    assert find(PatientID="PID-1") == [uid[0]]
    assert find(PatientID="pid-1") == []  # case-sensitive (PS3.4 C.2.2.2.1)
    assert find(PatientID="PID-*") == [uid[0], uid[2], uid[3]]
    assert find(AccessionNumber="ACC3") == [uid[2]]
    assert find(StudyDate="20240210") == [uid[1]]
    assert find(StudyDate="20240201-20240331") == [uid[1], uid[2]]
    assert find(StudyDate="-20240210") == [uid[0], uid[1]]
    assert find(StudyDate="20240316-") == [uid[3]]
    assert find(StudyTime="10-14") == [uid[1], uid[2]]  # 10:00:00 to 14:59:59.999999
    assert find(StudyTime="1015-1016") == [uid[1]]
    assert find(StudyDate="20240101-20240331", StudyTime="-1200") == [uid[0], uid[1]]
    assert find(ModalitiesInStudy="MR") == [uid[1]]
    assert find(ModalitiesInStudy="MR,PT") == [uid[1], uid[3]]
    assert find(ModalitiesInStudy="MR\\PT") == [uid[1], uid[3]]
    assert find(StudyDescription="*chest*") == [uid[0], uid[1]]
    assert find(StudyDescription="ct abdomen") == [uid[2]]
    assert find(StudyInstanceUID=f"{uid[0]},{uid[3]}") == [uid[0], uid[3]]
    both = dw.search_for_studies(search_filters={"StudyInstanceUID": uid[1]})[0]
    assert both["00080061"]["Value"] == ["CT", "MR"]
    assert both["00201206"]["Value"] == [2] and both["00201208"]["Value"] == [4]
    assert both["00081030"]["Value"] == ["Chest CT follow-up"]
    assert both["00080030"]["Value"] == ["101500.25"]
    assert both["00081190"]["Value"][0] == f"{web.url}/studies/{uid[1]}"


def test_includefield_limit_and_offset(node: Any) -> None:
    web, studies = node
    dw = _client(web)
    uid = [s["uid"] for s in studies]
    page = dw.search_for_studies(limit=2, offset=1)
    assert _uids(page) == uid[1:3]
    assert _uids(dw.search_for_studies(limit=10, offset=3)) == uid[3:]
    assert dw.search_for_studies(offset=10) == []
    r = web.get("/studies", limit="0")
    assert r.status_code in (200, 204) and (r.status_code == 204 or r.json() == [])
    # a series-level attribute in a study search's includefield is not returned (10.6.3.3.1)
    js = web.get("/studies", includefield="00081030,00080060", limit="1").json()[0]
    assert "00081030" in js and "00080060" not in js
    # study attributes come with a series search when asked, or when searching all series
    series = dw.search_for_series(uid[0], fields=["PatientName", "00080020"])
    assert series[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^JOHN"
    assert series[0]["00080020"]["Value"] == ["20240105"]
    everything = web.get(f"/studies/{uid[1]}/series", includefield="all").json()
    assert {s["00080060"]["Value"][0] for s in everything} == {"CT", "MR"}
    assert all("00100020" in s and "0008103E" in s for s in everything)
    all_series = dw.search_for_series(search_filters={"Modality": "MR"})
    assert len(all_series) == 1 and all_series[0]["00100020"]["Value"] == ["pid-2"]
    assert all_series[0]["00201209"]["Value"] == [2]


def test_series_and_instance_matching(node: Any) -> None:
    web, studies = node
    dw = _client(web)
    uid = studies[1]["uid"]
    mr = dw.search_for_series(uid, search_filters={"Modality": "MR"})
    assert len(mr) == 1 and mr[0]["0008103E"]["Value"] == ["MR series 2"]
    assert _uids(dw.search_for_series(uid, search_filters={"SeriesNumber": "1"}),
                 "00080060") == ["CT"]
    assert dw.search_for_series(search_filters={"SeriesDescription": "pt *"})[0][
        "0020000D"]["Value"] == [studies[3]["uid"]]
    series_uid = mr[0]["0020000E"]["Value"][0]
    instances = dw.search_for_instances(uid, series_uid)
    assert len(instances) == 2
    first = instances[0]
    assert first["00280010"]["Value"] == [16] and first["00280011"]["Value"] == [16]
    assert first["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    number = first["00200013"]["Value"][0]
    only = dw.search_for_instances(uid, series_uid, search_filters={"InstanceNumber": number})
    assert _uids(only, "00080018") == [first["00080018"]["Value"][0]]
    sops = [i["00080018"]["Value"][0] for i in instances]
    assert _uids(dw.search_for_instances(search_filters={"SOPInstanceUID": ",".join(sops)}),
                 "00080018") == sops
    # all instances of a study carry the series attributes; all instances, the study's too
    in_study = web.get(f"/studies/{uid}/instances", Modality="MR").json()
    assert len(in_study) == 2 and in_study[0]["0008103E"]["Value"] == ["MR series 2"]
    across = web.get("/instances", PatientID="PID-3").json()
    assert len(across) == 2 and across[0]["00100010"]["Value"][0]["Alphabetic"] == "SMITH^ANNA"


@pytest.mark.parametrize("path,params,reason", [
    ("/studies", {"StudyDate": "2024-13-45"}, "not a date"),
    ("/studies", {"StudyDate": "20240231"}, "not a date"),
    ("/studies", {"StudyDate": "20240301-20240101"}, "ends before it starts"),
    ("/studies", {"StudyDate": "-"}, "not a date"),
    ("/studies", {"StudyTime": "25"}, "not a time"),
    ("/studies", {"includefield": "NoSuchKeyword"}, "unknown includefield"),
    ("/studies", {"includefield": "FFFF0001"}, "unknown includefield"),
    ("/studies", {"limit": "ten"}, "limit must be"),
    ("/studies", {"limit": "-1"}, "limit must be"),
    ("/studies", {"offset": "1.5"}, "offset must be"),
    ("/studies", {"NoSuchKeyword": "x"}, "unknown query key"),
    ("/studies", {"SOPInstanceUID": "1.2.3"}, "instance-level attribute"),
    ("/studies", {"Modality": "CT"}, "series-level attribute"),
    ("/studies", {"StudyInstanceUID": "1.2.abc"}, "not a UID"),
    ("/series", {"SeriesNumber": "two"}, "not an integer"),
    ("/studies", {"fuzzymatching": "maybe"}, "true or false"),
])
def test_bad_queries_are_400_with_a_reason(node: Any, path: str, params: dict[str, str],
                                            reason: str) -> None:
    web, _ = node
    r = web.get(path, **params)
    assert r.status_code == 400, (r.status_code, r.text)
    assert reason in r.text


def test_keys_the_node_cannot_apply_are_named_in_a_warning(node: Any) -> None:
    web, studies = node
    r = web.get("/studies", PatientName="doe*", fuzzymatching="true")
    assert r.status_code == 200 and len(r.json()) == 2
    assert r.headers["warning"] == (
        f'299 {web.url}: "The fuzzymatching parameter is not supported. Only literal'
        ' matching has been performed."')
    r = web.get("/studies", PatientAge="030Y", PatientID="PID-1")
    assert r.status_code == 200 and _uids(r.json()) == [studies[0]["uid"]]
    assert "PatientAge" in r.headers["warning"] and r.headers["warning"].startswith("299 ")
    assert "warning" not in web.get("/studies", PatientID="PID-1").headers


def test_more_results_than_the_maximum_are_announced(node: Any, monkeypatch: Any) -> None:
    from dicomnode.web import qido

    web, studies = node
    monkeypatch.setitem(qido.MAX_RESULTS, "study", 2)
    r = web.get("/studies")
    assert len(r.json()) == 2
    assert "There are additional results that can be requested" in r.headers["warning"]
    r = web.get("/studies", limit="2")  # a page the client asked for: no warning
    assert len(r.json()) == 2 and "warning" not in r.headers


def test_results_of_the_node_are_found_by_qido_too(tmp_path: Path) -> None:
    """record_results indexes a result's attributes: a SEG is found by Modality."""
    import time

    from dicomnode.core.attributes import InstanceAttributes
    from dicomnode.core.index import InstanceRecord
    from dicomnode.core.records import ResultSet

    web = Web(tmp_path / "storage")
    try:
        files = make_series(tmp_path / "ct", n=2, size=16)
        _client(web).store_instances([pydicom.dcmread(f) for f in files])
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        seg = InstanceRecord("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.66.4", study, "1.2.3.4.6",
                             "1.2.840.10008.1.2.1", "DICOMNODE", 10, time.time(), "x.dcm",
                             origin="result", attributes=InstanceAttributes(
                                 modality="SEG", series_number=99, rows=16, columns=16,
                                 number_of_frames=4, series_description="lungs"))
        web.index.record_results(ResultSet("k", study, {"seg": ("1.2.3.4.5",)}), [seg])
        found = web.get("/series", Modality="SEG").json()
        assert found[0]["0020000E"]["Value"] == ["1.2.3.4.6"]
        assert found[0]["00200011"]["Value"] == [99]
        assert web.get("/studies").json()[0]["00080061"]["Value"] == ["CT", "SEG"]
    finally:
        web.stop()


# -- the index: attributes at admission, migration from schema 1 -------------------------------


def test_header_scan_reads_what_pydicom_reads_on_the_chest_ct() -> None:
    from pydicom.filereader import _read_file_meta_info

    for path in dicom_files(shared("tcia-lung-pet-ct-dx"))[:8]:
        raw = path.read_bytes()
        bio = io.BytesIO(raw)
        bio.seek(132)
        meta = _read_file_meta_info(bio)
        attrs = read_header(raw[bio.tell():], str(meta.TransferSyntaxUID)).attributes
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert attrs is not None
        assert attrs.patient_id == ds.PatientID and attrs.patient_name == str(ds.PatientName)
        assert attrs.study_date == ds.StudyDate and attrs.study_time == ds.StudyTime
        assert attrs.modality == "CT" and attrs.study_description == ds.get(
            "StudyDescription", "")
        assert (attrs.rows, attrs.columns) == (ds.Rows, ds.Columns)
        assert attrs.instance_number == ds.InstanceNumber
        assert attrs.series_number == ds.SeriesNumber


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
@pytest.mark.parametrize("charset,name", [
    ("ISO_IR 192", "MÜLLER^JÜRGEN"),
    ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # PS3.5 H.3.1
    ("", "DOE^JOHN"),
])
def test_header_scan_reads_the_search_attributes_in_every_syntax(
        tmp_path: Path, ts: str, charset: str, name: str) -> None:
    """Rows and Columns (binary US, either byte order), numbers (IS), dates, and names in
    the data set's character set (ISO 2022 escapes included), in every syntax."""
    from pydicom.filewriter import dcmwrite

    ds = pydicom.dcmread(make_series(tmp_path / "s", n=1, size=24)[0])
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.PatientName, ds.StudyDate, ds.Columns = name, "2024.03.15", 24
    ds.InstanceNumber, ds.SeriesNumber, ds.AccessionNumber = 17, 3, "A-1"
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    data = raw[132 + 12 + int.from_bytes(raw[140:144], "little"):]
    attrs = read_header(data, ts).attributes
    assert attrs is not None
    assert attrs.patient_name == name and attrs.study_date == "20240315"
    assert (attrs.rows, attrs.columns, attrs.number_of_frames) == (24, 24, None)
    assert (attrs.instance_number, attrs.series_number) == (17, 3)
    assert (attrs.accession_number, attrs.modality) == ("A-1", "CT")


_SCHEMA_V1 = """
CREATE TABLE instances (id INTEGER PRIMARY KEY AUTOINCREMENT,
 sop_instance_uid TEXT NOT NULL UNIQUE, sop_class_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
 series_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, calling_ae TEXT NOT NULL,
 called_ae TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL, received_at REAL NOT NULL,
 path TEXT NOT NULL, expected_count INTEGER,
 origin TEXT NOT NULL DEFAULT 'received' CHECK (origin IN ('received', 'result')));
"""


def test_an_index_from_schema_1_is_migrated_and_backfilled(tmp_path: Path) -> None:
    """A database written before the attribute tables gets them (PRAGMA user_version 2),
    and the start-up backfill reads the attributes from the stored files."""
    root = tmp_path / "storage"
    spool = Spool(root)
    files = make_series(tmp_path / "ct", n=3, size=16)
    db = sqlite3.connect(Index.path_for(root))
    db.executescript(_SCHEMA_V1 + "PRAGMA user_version = 1;")
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.PatientName = "OLD^PATIENT"
        target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                     ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        db.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid,"
                   " series_uid, transfer_syntax, calling_ae, size, received_at, path)"
                   " VALUES (?,?,?,?,?,?,?,?,?)",
                   (ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                    ds.SeriesInstanceUID, "1.2.840.10008.1.2.1", "OLD", 1, float(n),
                    str(target.relative_to(root))))
    db.commit()
    db.close()
    index = Index(Index.path_for(root))
    try:
        assert index.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 3
        placeholder = index.query("SELECT patient_name, complete FROM study_attributes")
        assert [tuple(r) for r in placeholder] == [("", 0)]
        assert backfill_attributes(index, spool) == 3
        assert backfill_attributes(index, spool) == 0
        row = index.query("SELECT patient_name, complete FROM study_attributes")[0]
        assert tuple(row) == ("OLD^PATIENT", 1)
        assert index.query("SELECT count(*) FROM instances WHERE n_rows = 16")[0][0] == 3
        # and a second process opening it does not migrate again
        Index(Index.path_for(root)).close()
    finally:
        index.close()


def test_attributes_leave_with_the_last_instance(tmp_path: Path) -> None:
    web = Web(tmp_path / "storage")
    try:
        files = make_series(tmp_path / "ct", n=2, size=16)
        _client(web).store_instances([pydicom.dcmread(f) for f in files])
        paths = [r.path for r in web.index.instances()]
        web.index.remove_instances(paths[:1])
        assert len(web.get("/studies").json()) == 1
        web.index.remove_instances(paths[1:])
        assert web.get("/studies").status_code == 204
        assert web.index.query("SELECT count(*) FROM series_attributes")[0][0] == 0
    finally:
        web.stop()


def test_withdrawn_results_are_not_offered(tmp_path: Path) -> None:
    """Results withdrawn by an IOCM rejection note (dicomnode.withdrawal) leave QIDO-RS and
    WADO-RS: the instance, an emptied series, and the study's counts and modalities."""
    import time

    from dicomnode.core.attributes import InstanceAttributes
    from dicomnode.core.index import InstanceRecord
    from dicomnode.core.records import ResultSet

    web = Web(tmp_path / "storage")
    try:
        files = make_series(tmp_path / "ct", n=2, size=16)
        _client(web).store_instances([pydicom.dcmread(f) for f in files])
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        seg = InstanceRecord("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.66.4", study, "1.2.3.4.6",
                             "1.2.840.10008.1.2.1", "DICOMNODE", 10, time.time(),
                             str(web.index.instances()[0].path), origin="result",
                             attributes=InstanceAttributes(modality="SEG"))
        web.index.record_results(ResultSet("k", study, {"seg": ("1.2.3.4.5",)}), [seg])
        assert web.get("/studies").json()[0]["00080061"]["Value"] == ["CT", "SEG"]
        web.index.mark_withdrawn(study, ["1.2.3.4.5"], "rejected", ["1.2.9"])
        js = web.get("/studies").json()[0]
        assert js["00080061"]["Value"] == ["CT"] and js["00201208"]["Value"] == [2]
        assert js["00201206"]["Value"] == [1]
        assert web.get("/series", Modality="SEG").status_code == 204
        assert web.get("/instances", SOPInstanceUID="1.2.3.4.5").status_code == 204
        assert web.get(f"/studies/{study}/series/1.2.3.4.6/instances/1.2.3.4.5"
                       ).status_code == 404
        assert len(web.get(f"/studies/{study}/instances").json()) == 2
    finally:
        web.stop()
