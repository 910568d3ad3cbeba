"""Audit events (PS3.15 A.5) and their forwarding as IHE ATNA syslog over TLS (RFC 5424/5425).

The XML is checked against the structure of the PS3.15 A.5.1 audit message schema
(element names and order, attribute names, value sets); the forwarding tests run a real
TLS syslog listener on 127.0.0.1 with certificates made here, requiring the client's.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dicomnode.audit import events as ev
from dicomnode.audit.forward import BOM, Forwarder, frame, outcome_of, syslog_message

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
PATIENT_ID = "PAT-7731"
PATIENT_NAME = "Testpatient^Erika"
AT = dt.datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
NODE = ev.NodeIdentity(ae_title="AINODE", host="ainode.example.org", site_id="Site-1")


def all_events() -> dict[str, ev.AuditEvent]:
    """One event of each builder (and variant), all at ``AT``."""
    kw = {"node": NODE, "at": AT}
    return {
        "start": ev.application_activity(True, "AINODE", "ainode.example.org", at=AT),
        "stop": ev.application_activity(False, "AINODE", "10.1.2.3", user="svc", at=AT),
        "assoc_ok": ev.association(True, "CT01", "AINODE", "10.0.0.7:40112", **kw),
        "assoc_rejected": ev.association(
            False, "EVIL", "AINODE", "10.0.0.66", reason="calling AE not allowed", **kw
        ),
        "received": ev.instances_received(
            "CT01", "10.0.0.7", "AINODE", STUDY, {CT: 120}, PATIENT_ID, PATIENT_NAME, 0,
            accession="ACC123", **kw,
        ),
        "received_partial": ev.instances_received(
            "CT01", "10.0.0.7", "AINODE", STUDY, {CT: 3}, PATIENT_ID, PATIENT_NAME, 4,
            description="2 instances refused: disk full", **kw,
        ),
        "completed": ev.study_completed(STUDY, 1, 120, PATIENT_ID, PATIENT_NAME, **kw),
        "matched": ev.rule_matched(STUDY, "chest-ct", "lung-nodules", **kw),
        "no_match": ev.rule_matched(STUDY, None, None, **kw),
        "job_started": ev.job("started", "job-42", "lung-nodules", "1.2.0", STUDY, SERIES, **kw),
        "job_finished": ev.job("finished", "job-42", "lung-nodules", "1.2.0", STUDY, SERIES, **kw),
        "job_failed": ev.job(
            "failed", "job-42", "lung-nodules", "1.2.0", STUDY, SERIES, error="CUDA OOM", **kw
        ),
        "sent": ev.result_sent(
            "PACS", "pacs.example.org:11112", STUDY, {SEG: 1, SR: 1}, True,
            patient_id=PATIENT_ID, patient_name=PATIENT_NAME, **kw,
        ),
        "given_up": ev.result_sent(
            "https://pacs.example.org/dicomweb", None, STUDY, {SEG: 1}, False,
            reason="HTTP 403 after 12 attempts", **kw,
        ),
        "config_ok": ev.config_loaded("/etc/dicomnode/node.yaml", True, **kw),
        "config_bad": ev.config_loaded(
            "/etc/dicomnode/node.yaml", False, reason="storage.path: missing", **kw
        ),
        "audit_export": ev.audit_log_used("export", "alice", 0, **kw),
        "audit_verify_failed": ev.audit_log_used("verify", "auditor", 8, **kw),
        "purged": ev.data_purged(STUDY, 120, PATIENT_ID, PATIENT_NAME, "retention 30 days", **kw),
        "keys": ev.keys_rotated("k-2025-03", user="root", **kw),
    }


# (EventID code, EventActionCode, EventOutcomeIndicator, EventTypeCode codes)
EXPECTED = {
    "start": ("110100", "E", 0, ["110120"]),
    "stop": ("110100", "E", 0, ["110121"]),
    "assoc_ok": ("110114", "E", 0, ["110122"]),
    "assoc_rejected": ("110114", "E", 4, ["110122"]),
    "received": ("110104", "C", 0, []),
    "received_partial": ("110104", "C", 4, []),
    "completed": ("110103", "R", 0, ["STUDY_COMPLETED"]),
    "matched": ("110103", "R", 0, ["RULE_MATCHED"]),
    "no_match": ("110103", "R", 0, ["RULE_NO_MATCH"]),
    "job_started": ("110103", "E", 0, ["JOB_STARTED"]),
    "job_finished": ("110103", "E", 0, ["JOB_FINISHED"]),
    "job_failed": ("110103", "E", 8, ["JOB_FAILED"]),
    "sent": ("110104", "C", 0, []),
    "given_up": ("110104", "C", 8, []),
    "config_ok": ("110113", "E", 0, ["110131"]),
    "config_bad": ("110113", "E", 8, ["110131"]),
    "audit_export": ("110101", "R", 0, ["AUDIT_EXPORT"]),
    "audit_verify_failed": ("110101", "R", 8, ["AUDIT_VERIFY"]),
    "purged": ("110105", "D", 0, ["RETENTION_PURGE"]),
    "keys": ("110113", "E", 0, ["110129"]),
}
WITH_PATIENT = {"received", "received_partial", "completed", "sent", "purged"}


@pytest.fixture(scope="module")
def events() -> dict[str, ev.AuditEvent]:
    return all_events()


def roles(p: ev.ActiveParticipant) -> list[str]:
    return [c.code for c in p.role_codes]


def test_every_builder_is_covered(events: dict[str, ev.AuditEvent]) -> None:
    assert set(events) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_event_identification(events: dict[str, ev.AuditEvent], name: str) -> None:
    event = events[name]
    code, action, outcome, types = EXPECTED[name]
    assert event.event.event_id.code == code
    assert event.event.action == action
    assert event.event.outcome == outcome
    assert [c.code for c in event.event.type_codes] == types
    assert event.event.date_time == AT and event.event.date_time.tzinfo is dt.UTC
    assert any(p.is_requestor for p in event.participants)
    assert event.source.type_codes == ("4",)


def test_codes_match_pydicom_dictionary() -> None:
    """Every DCM code used has the meaning PS3.16 gives it (pydicom's concept dictionary)."""
    from pydicom.sr._concepts_dict import concepts

    dcm = {code: meaning for entry in concepts["DCM"].values() for code, (meaning, _) in entry.items()}
    used = [v for v in vars(ev).values() if isinstance(v, ev.Code) and v.scheme == "DCM"]
    assert len(used) >= 15
    for code in used:
        assert dcm.get(code.code) == code.meaning, code


def test_participants_of_the_network_events(events: dict[str, ev.AuditEvent]) -> None:
    calling, called = events["assoc_rejected"].participants
    assert (calling.user_id, calling.is_requestor, roles(calling)) == ("EVIL", True, ["110153"])
    assert (calling.network_access_point_id, calling.network_access_point_type) == ("10.0.0.66", 2)
    assert (called.user_id, called.is_requestor, roles(called)) == ("AINODE", False, ["110152"])
    assert events["assoc_rejected"].event.outcome_description == "calling AE not allowed"
    port_stripped = events["assoc_ok"].participants[0]
    assert port_stripped.network_access_point_id == "10.0.0.7"

    source, dest = events["received"].participants
    assert (source.user_id, roles(source), source.is_requestor) == ("CT01", ["110153"], True)
    assert (dest.user_id, roles(dest), dest.is_requestor) == ("AINODE", ["110152"], False)

    node, pacs = events["sent"].participants
    assert (node.user_id, roles(node), node.is_requestor) == ("AINODE", ["110153"], True)
    assert (pacs.user_id, roles(pacs), pacs.network_access_point_id) == (
        "PACS", ["110152"], "pacs.example.org")
    assert pacs.network_access_point_type == 1
    assert events["given_up"].participants[1].network_access_point_id is None

    app = events["start"].participants[0]
    assert roles(app) == ["110150"] and app.alternative_user_id == "AETITLES=AINODE"
    assert (app.network_access_point_id, app.network_access_point_type) == ("ainode.example.org", 1)
    launcher = events["stop"].participants[1]
    assert (launcher.user_id, roles(launcher), launcher.is_requestor) == ("svc", ["110151"], True)
    assert events["stop"].participants[0].network_access_point_type == 2

    model = events["job_failed"].participants[1]
    assert (model.user_id, roles(model)) == ("lung-nodules@1.2.0", ["110150"])
    assert events["job_failed"].event.outcome_description == "CUDA OOM"


def test_participant_objects(events: dict[str, ev.AuditEvent]) -> None:
    study, patient = events["received"].objects
    assert (study.object_id, study.id_type.code, study.type_code, study.role) == (STUDY, "110180", 2, 3)
    assert study.description is not None
    assert study.description.sop_classes == (ev.SOPClass(uid=CT, number_of_instances=120),)
    assert study.description.accessions == ("ACC123",)
    assert (patient.object_id, patient.name, patient.type_code, patient.role) == (
        PATIENT_ID, PATIENT_NAME, 1, 1)
    assert (patient.id_type.code, patient.id_type.scheme) == ("2", "RFC-3881")

    sop = events["sent"].objects[0].description
    assert sop is not None and {(s.uid, s.number_of_instances) for s in sop.sop_classes} == {
        (SEG, 1), (SR, 1)}
    assert len(events["given_up"].objects) == 1  # no patient given, no patient object

    rule = events["matched"].objects[1]
    assert (rule.object_id, rule.role, rule.details) == ("chest-ct", 23, (("Model", "lung-nodules"),))
    assert len(events["no_match"].objects) == 1

    study, job = events["job_started"].objects
    assert ("SeriesInstanceUID", SERIES) in study.details
    assert (job.object_id, job.role, job.id_type.scheme) == ("job-42", 20, "99DICOMNODE")

    purged = events["purged"].objects
    assert all(o.life_cycle == 15 for o in purged)
    assert purged[0].description == ev.ObjectDescription(sop_classes=(ev.SOPClass(120),))
    assert events["purged"].event.outcome_description == "retention 30 days"
    assert events["audit_export"].objects[0].name == "Security Audit Log"
    assert events["keys"].objects[0].object_id == "k-2025-03"
    assert events["config_bad"].objects[0].object_id == "/etc/dicomnode/node.yaml"
    assert events["completed"].objects[0].details == (("Revision", "1"),)


def _without_patient_objects(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d["ParticipantObjectIdentification"] = [
        o for o in d["ParticipantObjectIdentification"] if o.get("ParticipantObjectTypeCodeRole") != 1
    ]
    return d


@pytest.mark.parametrize("name", sorted(WITH_PATIENT))
def test_patient_identifiers_only_in_patient_objects(events: dict[str, ev.AuditEvent], name: str) -> None:
    event = events[name]
    full = json.dumps(ev.to_dict(event))
    assert PATIENT_ID in full and PATIENT_NAME in full
    rest = json.dumps(_without_patient_objects(ev.to_dict(event)))
    assert PATIENT_ID not in rest and PATIENT_NAME not in rest
    patients = [o for o in event.objects if o.is_patient]
    assert len(patients) == 1 and patients[0].object_id == PATIENT_ID


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_redacted_has_no_patient_identifiers(events: dict[str, ev.AuditEvent], name: str) -> None:
    text = json.dumps(ev.redacted(events[name]))
    assert PATIENT_ID not in text and PATIENT_NAME not in text and "Erika" not in text
    assert "ACC123" not in text
    assert STUDY in text or name in {"start", "stop", "assoc_ok", "assoc_rejected", "config_ok",
                                     "config_bad", "audit_export", "audit_verify_failed", "keys"}
    if name in WITH_PATIENT:
        assert ev.REDACTED in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dict_round_trip(events: dict[str, ev.AuditEvent], name: str) -> None:
    d = ev.to_dict(events[name])
    again = ev.from_dict(json.loads(json.dumps(d)))
    assert again == events[name]
    assert ev.to_dict(again) == d


def test_from_dict_names_missing_fields(events: dict[str, ev.AuditEvent]) -> None:
    d = ev.to_dict(events["received"])
    del d["AuditSourceIdentification"]["AuditSourceID"]
    with pytest.raises(ValueError, match="AuditSourceID"):
        ev.from_dict(d)


def test_constructors_validate() -> None:
    naive = dt.datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="date_time"):
        ev.EventIdentification(ev.EV_APPLICATION_ACTIVITY, "E", naive)
    with pytest.raises(ValueError, match="action"):
        ev.EventIdentification(ev.EV_APPLICATION_ACTIVITY, "X", AT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outcome"):
        ev.EventIdentification(ev.EV_APPLICATION_ACTIVITY, "E", AT, outcome=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="participants"):
        ev.AuditEvent(ev.EventIdentification(ev.EV_APPLICATION_ACTIVITY, "E", AT), (), ev.AuditSource("x"))
    with pytest.raises(ValueError, match="state"):
        ev.job("paused", "j", "m", "1", STUDY, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="network_access_point_type"):
        ev.ActiveParticipant("u", True, network_access_point_id="h")
    with pytest.raises(ValueError, match="study_uid"):
        ev.rule_matched("", None, None)
    # another time zone is the same instant, kept in UTC
    cet = dt.timezone(dt.timedelta(hours=1))
    e = ev.EventIdentification(ev.EV_APPLICATION_ACTIVITY, "E", AT.astimezone(cet))
    assert e.date_time == AT and e.date_time.utcoffset() == dt.timedelta(0)
    with pytest.raises(AttributeError):
        e.action = "R"  # type: ignore[misc]  # frozen


# --------------------------------------------------------------------------- XML structure

CODE = ({"csd-code", "codeSystemName", "originalText"}, {"displayName"}, [])


@dataclass(frozen=True)
class Rule:
    required: set[str]
    optional: set[str]
    children: list[tuple[str, int, int | None]]  # name ("A|B" for a choice), min, max
    text: bool = False


# The PS3.15 A.5.1.1 audit message schema, element by element. RELAX NG lets attributes
# come in any order; child elements must follow the schema's order.
SCHEMA: dict[str, Rule] = {
    "AuditMessage": Rule(set(), set(), [
        ("EventIdentification", 1, 1), ("ActiveParticipant", 1, None),
        ("AuditSourceIdentification", 1, 1), ("ParticipantObjectIdentification", 0, None)]),
    "EventIdentification": Rule(
        {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"},
        [("EventID", 1, 1), ("EventTypeCode", 0, None), ("EventOutcomeDescription", 0, 1)]),
    "EventID": Rule(*CODE),
    "EventTypeCode": Rule(*CODE),
    "EventOutcomeDescription": Rule(set(), set(), [], text=True),
    "ActiveParticipant": Rule(
        {"UserID", "UserIsRequestor"},
        {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"},
        [("RoleIDCode", 0, None), ("MediaIdentifier", 0, 1)]),
    "RoleIDCode": Rule(*CODE),
    "AuditSourceIdentification": Rule(
        {"AuditSourceID"}, {"AuditEnterpriseSiteID"}, [("AuditSourceTypeCode", 0, None)]),
    "AuditSourceTypeCode": Rule({"csd-code"}, {"codeSystemName", "displayName", "originalText"}, []),
    "ParticipantObjectIdentification": Rule(
        {"ParticipantObjectID"},
        {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
         "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"},
        [("ParticipantObjectIDTypeCode", 1, 1),
         ("ParticipantObjectName|ParticipantObjectQuery", 0, 1),
         ("ParticipantObjectDetail", 0, None), ("ParticipantObjectDescription", 0, None)]),
    "ParticipantObjectIDTypeCode": Rule(*CODE),
    "ParticipantObjectName": Rule(set(), set(), [], text=True),
    "ParticipantObjectDetail": Rule({"type", "value"}, set(), []),
    "ParticipantObjectDescription": Rule(set(), set(), [
        ("MPPS", 0, None), ("Accession", 0, None), ("SOPClass", 0, None),
        ("ParticipantObjectContainsStudy", 0, 1), ("Encrypted", 0, 1), ("Anonymized", 0, 1)]),
    "Accession": Rule({"Number"}, set(), []),
    "SOPClass": Rule({"NumberOfInstances"}, {"UID"}, [("Instance", 0, None)]),
}

XSD_DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
VALUES: dict[str, Callable[[str], bool]] = {
    "EventActionCode": lambda v: v in {"C", "R", "U", "D", "E"},
    "EventOutcomeIndicator": lambda v: v in {"0", "4", "8", "12"},
    "EventDateTime": lambda v: bool(XSD_DATETIME.match(v)),
    "UserIsRequestor": lambda v: v in {"true", "false", "1", "0"},
    "NetworkAccessPointTypeCode": lambda v: v in {"1", "2", "3", "4", "5"},
    "ParticipantObjectTypeCode": lambda v: v in {"1", "2", "3", "4"},
    "ParticipantObjectTypeCodeRole": lambda v: v.isdigit() and 1 <= int(v) <= 26,
    "ParticipantObjectDataLifeCycle": lambda v: v.isdigit() and 1 <= int(v) <= 15,
    "NumberOfInstances": lambda v: v.isdigit(),
    "value": lambda v: base64.b64encode(base64.b64decode(v, validate=True)).decode() == v,
}


def check_schema(element: ET.Element, path: str = "") -> None:
    """Assert that ``element`` follows the audit message schema (PS3.15 A.5.1.1)."""
    path = f"{path}/{element.tag}"
    assert element.tag in SCHEMA, f"{path}: element not in the schema"
    rule = SCHEMA[element.tag]
    attrs = set(element.attrib)
    assert rule.required <= attrs, f"{path}: missing {rule.required - attrs}"
    assert attrs <= rule.required | rule.optional, f"{path}: unknown {attrs - rule.required - rule.optional}"
    for name, value in element.attrib.items():
        assert value.strip(), f"{path}@{name} is empty"
        if name in VALUES:
            assert VALUES[name](value), f"{path}@{name}={value!r} not allowed"
    if element.tag == "AuditSourceTypeCode" and element.get("csd-code") not in set("123456789"):
        assert element.get("codeSystemName"), f"{path}: a non-RFC 3881 code needs codeSystemName"
    if not rule.text:
        assert not (element.text or "").strip(), f"{path}: unexpected text"
    children = list(element)
    i = 0
    for names, low, high in rule.children:
        n = 0
        while i < len(children) and children[i].tag in names.split("|"):
            i += 1
            n += 1
        assert n >= low, f"{path}: needs at least {low} {names}"
        assert high is None or n <= high, f"{path}: at most {high} {names}"
    assert i == len(children), f"{path}: {children[i].tag} not allowed here (order or name)"
    for child in children:
        check_schema(child, path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_xml_follows_the_schema(events: dict[str, ev.AuditEvent], name: str) -> None:
    event = events[name]
    text = ev.to_xml(event)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    root = ET.fromstring(text.encode("utf-8"))
    check_schema(root)

    ident = root.find("EventIdentification")
    assert ident is not None
    code, action, outcome, types = EXPECTED[name]
    assert ident.get("EventActionCode") == action
    assert ident.get("EventOutcomeIndicator") == str(outcome)
    assert ident.get("EventDateTime") == "2025-03-04T05:06:07.890123Z"
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.attrib == {
        "csd-code": code, "codeSystemName": event.event_id.scheme,
        "originalText": event.event_id.meaning}
    assert [t.get("csd-code") for t in ident.findall("EventTypeCode")] == types
    assert len(root.findall("ActiveParticipant")) == len(event.participants)
    assert len(root.findall("ParticipantObjectIdentification")) == len(event.objects)
    assert root.find("AuditSourceIdentification/AuditSourceTypeCode").get("csd-code") == "4"


def test_xml_content_of_instances_received(events: dict[str, ev.AuditEvent]) -> None:
    root = ET.fromstring(ev.to_xml(events["received"]))
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.attrib == {
        "AuditSourceID": "AINODE@ainode.example.org", "AuditEnterpriseSiteID": "Site-1"}
    first = root.find("ActiveParticipant")
    assert first is not None and first.attrib == {
        "UserID": "CT01", "AlternativeUserID": "AETITLES=CT01", "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.0.0.7", "NetworkAccessPointTypeCode": "2"}
    assert first.find("RoleIDCode").attrib == {
        "csd-code": "110153", "codeSystemName": "DCM", "originalText": "Source Role ID"}
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC123"
    assert study.find("ParticipantObjectDescription/SOPClass").attrib == {
        "UID": CT, "NumberOfInstances": "120"}
    assert patient.get("ParticipantObjectID") == PATIENT_ID
    assert patient.findtext("ParticipantObjectName") == PATIENT_NAME
    job = ET.fromstring(ev.to_xml(all_events()["job_started"]))
    detail = job.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "SeriesInstanceUID"
    assert base64.b64decode(detail.get("value", "")).decode() == SERIES


def test_xml_survives_hostile_text() -> None:
    event = ev.association(False, "A&B<C>", "NODE", "h", reason='bad "quote" \x00\x07 & <tag>',
                           node=NODE, at=AT)
    root = ET.fromstring(ev.to_xml(event))
    check_schema(root)
    assert root.find("ActiveParticipant").get("UserID") == "A&B<C>"
    assert root.findtext("EventIdentification/EventOutcomeDescription") == (
        'bad "quote" \ufffd\ufffd & <tag>')


# --------------------------------------------------------------------------- ATNA over TLS


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _make_certs(folder: Path) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        path.chmod(0o600)  # the node refuses a private key that group or others may read
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("test audit CA")).issuer_name(name("test audit CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client, client_key = leaf("ainode", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("ainode")])
    return Certs(
        ca=write_cert(ca_cert, folder / "ca.pem"),
        server_cert=write_cert(server, folder / "server.pem"),
        server_key=write_key(server_key, folder / "server.key"),
        client_cert=write_cert(client, folder / "client.pem"),
        client_key=write_key(client_key, folder / "client.key"),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return _make_certs(tmp_path_factory.mktemp("certs"))


class SyslogListener:
    """An RFC 5425 receiver on 127.0.0.1: TLS 1.2+, client certificate required."""

    def __init__(self, certs: Certs, port: int = 0) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certs.server_cert, certs.server_key)
        ctx.load_verify_locations(certs.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._ctx = ctx
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(8)
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self.messages: list[bytes] = []
        self.peers: list[str] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._conns: list[ssl.SSLSocket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(5)
            conn = self._ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(repr(exc))
            raw.close()
            return
        self._conns.append(conn)
        cert = conn.getpeercert() or {}
        self.peers.append(dict(x[0] for x in cert.get("subject", ()))["commonName"])
        conn.settimeout(0.1)
        buffer = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                break
            if not data:
                break
            buffer += data
            while True:  # RFC 5425 octet counting: MSG-LEN SP SYSLOG-MSG
                space = buffer.find(b" ")
                if space < 0:
                    break
                assert buffer[:space].isdigit() and not buffer.startswith(b"0"), buffer[:40]
                length = int(buffer[:space])
                if len(buffer) < space + 1 + length:
                    break
                with self._cond:
                    self.messages.append(buffer[space + 1 : space + 1 + length])
                    self._cond.notify_all()
                buffer = buffer[space + 1 + length :]
        conn.close()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        self._thread.join(5)


@pytest.fixture
def listener(certs: Certs) -> Iterator[SyslogListener]:
    server = SyslogListener(certs)
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) - "
)


def parse(message: bytes) -> tuple[dict[str, str], ET.Element]:
    """RFC 5424 header fields and the XML payload of one syslog message."""
    match = HEADER.match(message)
    assert match, message[:120]
    payload = message[match.end():]
    assert payload.startswith(BOM)
    header = {k: v.decode("ascii") for k, v in match.groupdict().items()}
    return header, ET.fromstring(payload[len(BOM):])


def forwarder(tmp_path: Path, certs: Certs, port: int, **kw: object) -> Forwarder:
    options: dict[str, object] = {
        "certfile": certs.client_cert, "keyfile": certs.client_key, "hostname": "ainode.test",
        "backoff_initial": 0.05, "backoff_max": 0.2, "connect_timeout": 2.0,
        "clock": lambda: AT,
    }
    options.update(kw)
    return Forwarder(tmp_path / "atna", "127.0.0.1", port, certs.ca, **options)  # type: ignore[arg-type]


def test_syslog_message_format(events: dict[str, ev.AuditEvent]) -> None:
    xml = ev.to_xml(events["job_failed"])
    msg = syslog_message(xml, timestamp=AT, hostname="node a", procid="77")
    assert msg.startswith(b"<83>1 2025-03-04T05:06:07.890Z node_a dicomnode 77 IHE+RFC-3881 - \xef\xbb\xbf")
    assert frame(b"abc") == b"3 abc"
    assert outcome_of(xml) == 8
    with pytest.raises(ValueError, match="xml"):
        outcome_of("<notaudit/>")


def test_forwarding_over_tls(tmp_path: Path, certs: Certs, listener: SyslogListener,
                             events: dict[str, ev.AuditEvent]) -> None:
    fwd = forwarder(tmp_path, certs, listener.port)
    try:
        fwd.start()
        names = ["received", "assoc_rejected", "job_failed", "given_up"]
        for name in names:
            fwd.enqueue(ev.to_xml(events[name]))
        messages = listener.wait_for(len(names))
        assert len(messages) == len(names), (listener.errors, fwd.last_error)
        assert fwd.wait_idle(5) and fwd.pending() == 0
    finally:
        fwd.close()
    assert listener.peers[0] == "ainode"  # the node authenticated with its certificate
    for name, message in zip(names, messages, strict=True):
        header, root = parse(message)
        severity = {0: 5, 4: 4, 8: 3}[events[name].outcome]
        assert int(header["pri"]) == 10 * 8 + severity
        assert header["ts"] == "2025-03-04T05:06:07.890Z"
        assert (header["host"], header["app"], header["msgid"]) == (
            "ainode.test", "dicomnode", "IHE+RFC-3881")
        assert header["proc"].isdigit()
        check_schema(root)
        assert root.find("EventIdentification/EventID").get("csd-code") == EXPECTED[name][0]
        assert ET.tostring(root, encoding="unicode") == ev.to_xml(events[name], declaration=False)


def test_forwarder_refuses_an_untrusted_repository(tmp_path: Path, certs: Certs,
                                                   listener: SyslogListener) -> None:
    other = _make_certs(tmp_path)  # a CA the repository's certificate does not chain to
    fwd = Forwarder(tmp_path / "q", "127.0.0.1", listener.port, other.ca,
                    backoff_initial=0.05, backoff_max=0.1)
    try:
        fwd.start()
        fwd.enqueue(ev.to_xml(all_events()["start"]))
        deadline = time.monotonic() + 5
        while fwd.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fwd.last_error and "CERTIFICATE_VERIFY_FAILED" in fwd.last_error
        assert fwd.pending() == 1 and listener.messages == []
    finally:
        fwd.close()


def test_messages_queued_while_down_arrive_in_order(tmp_path: Path, certs: Certs) -> None:
    port = free_port()
    fwd = forwarder(tmp_path, certs, port)
    server = None
    try:
        fwd.start()
        xmls = [ev.to_xml(ev.job("started", f"job-{i}", "m", "1", STUDY, None, at=AT))
                for i in range(25)]
        for xml in xmls[:10]:
            fwd.enqueue(xml)
        deadline = time.monotonic() + 5
        while fwd.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fwd.last_error is not None  # it did try, and failed: the repository is down
        assert fwd.pending() == 10
        for xml in xmls[10:]:
            fwd.enqueue(xml)
        server = SyslogListener(certs, port)
        messages = server.wait_for(25)
        assert fwd.wait_idle(5)
    finally:
        fwd.close()
        if server is not None:
            server.stop()
    job_ids = [parse(m)[1].find("ParticipantObjectIdentification[2]").get("ParticipantObjectID")
               for m in messages]
    assert job_ids == [f"job-{i}" for i in range(25)]


def test_repository_restart_reconnects(tmp_path: Path, certs: Certs) -> None:
    server = SyslogListener(certs)
    port = server.port
    fwd = forwarder(tmp_path, certs, port)
    try:
        fwd.start()
        fwd.enqueue(ev.to_xml(all_events()["start"]))
        assert len(server.wait_for(1)) == 1
        server.stop()
        time.sleep(0.05)
        server = SyslogListener(certs, port)
        fwd.enqueue(ev.to_xml(all_events()["stop"]))
        messages = server.wait_for(1)
        assert len(messages) == 1
        assert parse(messages[0])[1].find("EventIdentification/EventTypeCode").get(
            "csd-code") == "110121"
    finally:
        fwd.close()
        server.stop()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_restart_of_the_forwarder_resumes_the_queue(tmp_path: Path, certs: Certs,
                                                    encrypted: bool) -> None:
    key = bytes(range(32)) if encrypted else None
    port = free_port()
    first = forwarder(tmp_path, certs, port, queue_key=key)
    try:
        first.start()  # repository down: everything stays queued
        for i in range(5):
            first.enqueue(ev.to_xml(ev.keys_rotated(f"k{i}", at=AT)))
    finally:
        first.close()
    queue_file = tmp_path / "atna" / "atna-queue.sqlite3"
    assert queue_file.stat().st_mode & 0o077 == 0
    if encrypted:
        # not readable on disk (a long marker: two random bytes can occur in ciphertext)
        on_disk = queue_file.read_bytes()
        assert b"<AuditMessage" not in on_disk and b"Security Alert" not in on_disk
        with pytest.raises(ValueError, match="queue_key"):
            forwarder(tmp_path, certs, port)

    server = SyslogListener(certs, port)
    second = forwarder(tmp_path, certs, port, queue_key=key)
    try:
        assert second.pending() == 5
        second.enqueue(ev.to_xml(ev.keys_rotated("k5", at=AT)))
        second.start()
        messages = server.wait_for(6)
        assert second.wait_idle(5)
    finally:
        second.close()
        server.stop()
    ids = [parse(m)[1].find("ParticipantObjectIdentification").get("ParticipantObjectID")
           for m in messages]
    assert ids == [f"k{i}" for i in range(6)]


def test_forwarder_validates_its_arguments(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(ValueError, match="port"):
        Forwarder(tmp_path, "127.0.0.1", 0, certs.ca)
    with pytest.raises(ValueError, match="ca_file"):
        Forwarder(tmp_path, "127.0.0.1", 6514, tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="keyfile"):
        Forwarder(tmp_path, "127.0.0.1", 6514, certs.ca, keyfile=certs.client_key)
    with pytest.raises(ValueError, match="queue_key"):
        Forwarder(tmp_path, "127.0.0.1", 6514, certs.ca, queue_key=b"short")
    fwd = Forwarder(tmp_path, "127.0.0.1", 6514, certs.ca)
    try:
        with pytest.raises(ValueError, match="xml"):
            fwd.enqueue("not xml")
        assert fwd.pending() == 0
    finally:
        fwd.close()


def test_event_replace_keeps_validation() -> None:
    event = all_events()["start"]
    with pytest.raises(ValueError):
        replace(event, participants=())


@pytest.mark.parametrize(("address", "expected"), [
    ("10.0.0.7", ("10.0.0.7", 2)),
    ("10.0.0.7:104", ("10.0.0.7", 2)),
    ("::1", ("::1", 2)),
    ("[fe80::1]:11112", ("fe80::1", 2)),
    ("PACS@pacs.example.org:11112", ("pacs.example.org", 1)),
    ("https://pacs.example.org:8443/dicomweb", ("pacs.example.org", 1)),
    ("", (None, None)),
    (None, (None, None)),
])
def test_network_access_point(address: str | None, expected: tuple) -> None:
    event = ev.result_sent("PACS", address, STUDY, {SEG: 1}, True, at=AT)
    dest = event.participants[1]
    assert (dest.network_access_point_id, dest.network_access_point_type) == expected


def test_builders_accept_what_the_stages_have() -> None:
    """Blank calling AE, unknown model version, empty patient ID: recorded, not refused."""
    rejected = ev.association(False, "  ", "AINODE", "10.0.0.9", reason="blank AE", at=AT)
    assert rejected.participants[0].user_id == ev.BLANK_AE
    started = ev.job("started", "j1", "lung", "", STUDY, SERIES, at=AT)
    assert started.participants[1].user_id == "lung"
    completed = ev.study_completed(STUDY, 0, 10, "", "", at=AT)
    assert [o.id_type.code for o in completed.objects] == ["110180"]
    for event in (rejected, started, completed):
        check_schema(ET.fromstring(ev.to_xml(event)))
        assert ev.from_dict(ev.to_dict(event)) == event
