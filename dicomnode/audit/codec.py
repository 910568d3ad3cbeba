"""The two encodings of an audit message: a JSON-able dict and the DICOM audit XML.

* :func:`to_dict` / :func:`from_dict` -- a dict keyed by the element and attribute
  names of the PS3.15 A.5.1 schema (RFC 3881), which the trail stores encrypted
  (:mod:`dicomnode.audit.trail`) and ``dicomnode audit export --format json`` prints;
  :func:`from_dict` rebuilds the :class:`~dicomnode.audit.model.AuditEvent` and raises
  ValueError naming the bad field.
* :func:`redacted` -- the dict without patient identifiers (PS3.15 A.5.2.6), for logs.
* :func:`to_xml` -- the ``AuditMessage`` of the PS3.15 A.5.1 schema, for
  ``dicomnode audit export --format xml`` and for forwarding to an ATNA audit
  repository over syslog (:mod:`dicomnode.audit.forward`, RFC 5424/5425).

The model itself is in :mod:`dicomnode.audit.model`.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dicomnode.audit.model import (
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    Code,
    EventIdentification,
    ObjectDescription,
    ParticipantObject,
    SOPClass,
)

REDACTED = "[redacted]"
"""What :func:`redacted` writes in place of a patient ID."""

# --------------------------------------------------------------------------- dict form


def _code_dict(code: Code) -> dict[str, str]:
    return {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning}


def _code_from(d: Mapping[str, Any]) -> Code:
    return Code(d["csd-code"], d["codeSystemName"], d["originalText"])


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


def format_datetime(value: datetime) -> str:
    """EventDateTime as xsd:dateTime in UTC with a ``Z`` (PS3.15 A.5.2.5), microseconds kept."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_dict(event: AuditEvent) -> dict[str, Any]:
    """A JSON-able dict with the schema's names (PS3.15 A.5.1); :func:`from_dict` inverts it."""
    e = event.event
    return {
        "EventIdentification": _drop_none(
            {
                "EventID": _code_dict(e.event_id),
                "EventActionCode": e.action,
                "EventDateTime": format_datetime(e.date_time),
                "EventOutcomeIndicator": e.outcome,
                "EventTypeCode": [_code_dict(c) for c in e.type_codes],
                "EventOutcomeDescription": e.outcome_description,
            }
        ),
        "ActiveParticipant": [
            _drop_none(
                {
                    "UserID": p.user_id,
                    "AlternativeUserID": p.alternative_user_id,
                    "UserName": p.user_name,
                    "UserIsRequestor": p.is_requestor,
                    "RoleIDCode": [_code_dict(c) for c in p.role_codes],
                    "NetworkAccessPointID": p.network_access_point_id,
                    "NetworkAccessPointTypeCode": p.network_access_point_type,
                }
            )
            for p in event.participants
        ],
        "AuditSourceIdentification": _drop_none(
            {
                "AuditSourceID": event.source.source_id,
                "AuditEnterpriseSiteID": event.source.enterprise_site_id,
                "AuditSourceTypeCode": list(event.source.type_codes),
            }
        ),
        "ParticipantObjectIdentification": [_object_dict(o) for o in event.objects],
    }


def _object_dict(o: ParticipantObject) -> dict[str, Any]:
    description = None
    if o.description is not None:
        description = _drop_none(
            {
                "SOPClass": [
                    _drop_none({"UID": s.uid, "NumberOfInstances": s.number_of_instances})
                    for s in o.description.sop_classes
                ],
                "Accession": list(o.description.accessions),
            }
        )
    return _drop_none(
        {
            "ParticipantObjectID": o.object_id,
            "ParticipantObjectTypeCode": o.type_code,
            "ParticipantObjectTypeCodeRole": o.role,
            "ParticipantObjectDataLifeCycle": o.life_cycle,
            "ParticipantObjectIDTypeCode": _code_dict(o.id_type),
            "ParticipantObjectName": o.name,
            "ParticipantObjectDetail": [{"type": t, "value": v} for t, v in o.details],
            "ParticipantObjectDescription": description,
        }
    )


def from_dict(d: Mapping[str, Any]) -> AuditEvent:
    """The :class:`AuditEvent` of a :func:`to_dict` dict; raises ValueError naming the bad field."""
    try:
        e = d["EventIdentification"]
        event = EventIdentification(
            event_id=_code_from(e["EventID"]),
            action=e["EventActionCode"],
            date_time=datetime.fromisoformat(e["EventDateTime"].replace("Z", "+00:00")),
            outcome=e["EventOutcomeIndicator"],
            type_codes=tuple(_code_from(c) for c in e.get("EventTypeCode", ())),
            outcome_description=e.get("EventOutcomeDescription"),
        )
        participants = tuple(
            ActiveParticipant(
                user_id=p["UserID"],
                alternative_user_id=p.get("AlternativeUserID"),
                user_name=p.get("UserName"),
                is_requestor=p["UserIsRequestor"],
                role_codes=tuple(_code_from(c) for c in p.get("RoleIDCode", ())),
                network_access_point_id=p.get("NetworkAccessPointID"),
                network_access_point_type=p.get("NetworkAccessPointTypeCode"),
            )
            for p in d["ActiveParticipant"]
        )
        s = d["AuditSourceIdentification"]
        source = AuditSource(
            source_id=s["AuditSourceID"],
            enterprise_site_id=s.get("AuditEnterpriseSiteID"),
            type_codes=tuple(s.get("AuditSourceTypeCode", ())),
        )
        objects = tuple(_object_from(o) for o in d.get("ParticipantObjectIdentification", ()))
    except KeyError as exc:
        raise ValueError(f"audit event dict: missing field {exc.args[0]!r}") from None
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"audit event dict: malformed ({exc})") from None
    return AuditEvent(event=event, participants=participants, source=source, objects=objects)


def _object_from(o: Mapping[str, Any]) -> ParticipantObject:
    description = None
    if "ParticipantObjectDescription" in o:
        desc = o["ParticipantObjectDescription"]
        description = ObjectDescription(
            sop_classes=tuple(
                SOPClass(uid=s.get("UID"), number_of_instances=s["NumberOfInstances"])
                for s in desc.get("SOPClass", ())
            ),
            accessions=tuple(desc.get("Accession", ())),
        )
    return ParticipantObject(
        object_id=o["ParticipantObjectID"],
        id_type=_code_from(o["ParticipantObjectIDTypeCode"]),
        type_code=o.get("ParticipantObjectTypeCode"),
        role=o.get("ParticipantObjectTypeCodeRole"),
        life_cycle=o.get("ParticipantObjectDataLifeCycle"),
        name=o.get("ParticipantObjectName"),
        details=tuple((x["type"], x["value"]) for x in o.get("ParticipantObjectDetail", ())),
        description=description,
    )


def redacted(event: AuditEvent) -> dict[str, Any]:
    """:func:`to_dict` without patient identifiers, for logs.

    Patient objects (role 1 or ID type "Patient Number") keep their type but have their
    ID replaced by ``[redacted]`` and lose name and details; accession numbers are
    removed from every description. Nothing else in an event carries patient data.
    """
    d = to_dict(event)
    for obj, o in zip(event.objects, d["ParticipantObjectIdentification"], strict=True):
        if obj.is_patient:
            o["ParticipantObjectID"] = REDACTED
            o.pop("ParticipantObjectName", None)
            o.pop("ParticipantObjectDetail", None)
        desc = o.get("ParticipantObjectDescription")
        if desc and desc.pop("Accession", None) is not None and not desc:
            o.pop("ParticipantObjectDescription")
    return d


# --------------------------------------------------------------------------- XML

# Characters XML 1.0 does not allow (2.2 Char); replaced so that a hostile name or
# reason cannot make the message unparseable.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(value: object) -> str:
    return _NOT_XML_CHAR.sub("\ufffd", str(value))


def _code_attrs(code: Code) -> dict[str, str]:
    return {
        "csd-code": _x(code.code),
        "codeSystemName": _x(code.scheme),
        "originalText": _x(code.meaning),
    }


def to_xml(event: AuditEvent, *, declaration: bool = True) -> str:
    """The DICOM audit message (PS3.15 A.5.1 schema, root ``AuditMessage``) as a string.

    Element order follows the schema: EventIdentification, ActiveParticipant+,
    AuditSourceIdentification, ParticipantObjectIdentification*; inside each, child
    elements in the schema's order. No namespace (the schema has none).

    One deviation from the letter of the A.5.1.1 schema text (2017c): a participant
    object without a name (a study, a patient whose name is unknown) has neither
    ParticipantObjectName nor ParticipantObjectQuery, although that schema makes the
    choice mandatory; the A.5.3 message tables give ParticipantObjectName as optional
    (U) for studies, and inventing a name would be worse. Everything else validates.
    """
    root = ET.Element("AuditMessage")
    e = event.event
    ev_attrs = {
        "EventActionCode": e.action,
        "EventDateTime": format_datetime(e.date_time),
        "EventOutcomeIndicator": str(e.outcome),
    }
    ev = ET.SubElement(root, "EventIdentification", ev_attrs)
    ET.SubElement(ev, "EventID", _code_attrs(e.event_id))
    for code in e.type_codes:
        ET.SubElement(ev, "EventTypeCode", _code_attrs(code))
    if e.outcome_description is not None:
        ET.SubElement(ev, "EventOutcomeDescription").text = _x(e.outcome_description)

    for p in event.participants:
        attrs = {"UserID": _x(p.user_id), "UserIsRequestor": "true" if p.is_requestor else "false"}
        if p.alternative_user_id is not None:
            attrs["AlternativeUserID"] = _x(p.alternative_user_id)
        if p.user_name is not None:
            attrs["UserName"] = _x(p.user_name)
        if p.network_access_point_id is not None:
            attrs["NetworkAccessPointID"] = _x(p.network_access_point_id)
            attrs["NetworkAccessPointTypeCode"] = str(p.network_access_point_type)
        ap = ET.SubElement(root, "ActiveParticipant", attrs)
        for code in p.role_codes:
            ET.SubElement(ap, "RoleIDCode", _code_attrs(code))

    src_attrs = {"AuditSourceID": _x(event.source.source_id)}
    if event.source.enterprise_site_id is not None:
        src_attrs["AuditEnterpriseSiteID"] = _x(event.source.enterprise_site_id)
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    for type_code in event.source.type_codes:
        ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": type_code})

    for o in event.objects:
        attrs = {"ParticipantObjectID": _x(o.object_id)}
        if o.type_code is not None:
            attrs["ParticipantObjectTypeCode"] = str(o.type_code)
        if o.role is not None:
            attrs["ParticipantObjectTypeCodeRole"] = str(o.role)
        if o.life_cycle is not None:
            attrs["ParticipantObjectDataLifeCycle"] = str(o.life_cycle)
        po = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
        ET.SubElement(po, "ParticipantObjectIDTypeCode", _code_attrs(o.id_type))
        if o.name is not None:
            ET.SubElement(po, "ParticipantObjectName").text = _x(o.name)
        for detail_type, value in o.details:
            ET.SubElement(
                po,
                "ParticipantObjectDetail",
                {"type": _x(detail_type), "value": base64.b64encode(value.encode()).decode()},
            )
        if o.description is not None:
            desc = ET.SubElement(po, "ParticipantObjectDescription")
            for number in o.description.accessions:
                ET.SubElement(desc, "Accession", {"Number": _x(number)})
            for sop in o.description.sop_classes:
                sop_attrs = {"NumberOfInstances": str(sop.number_of_instances)}
                if sop.uid is not None:
                    sop_attrs["UID"] = _x(sop.uid)
                ET.SubElement(desc, "SOPClass", sop_attrs)
    text = ET.tostring(root, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8"?>' + text) if declaration else text


__all__ = ["REDACTED", "format_datetime", "from_dict", "redacted", "to_dict", "to_xml"]
