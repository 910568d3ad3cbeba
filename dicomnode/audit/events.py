"""Audit events: the audit message model of DICOM PS3.15 Annex A.5 (after RFC 3881).

An :class:`AuditEvent` holds the four parts of an audit message (PS3.15 A.5.1):

* :class:`EventIdentification` -- EventID (CID 400), EventActionCode, EventDateTime
  (UTC), EventOutcomeIndicator, EventTypeCode (CID 401 or the private scheme
  ``99DICOMNODE``), EventOutcomeDescription;
* :class:`ActiveParticipant` -- who took part (calling / called AE, the node, a model,
  a user), with RoleIDCode (CID 402) and network access point;
* :class:`AuditSource` -- AuditSourceIdentification (the node that reports);
* :class:`ParticipantObject` -- ParticipantObjectIdentification: what was acted on
  (study, patient, job, rule, file, key), with ParticipantObjectDescription (SOP classes
  and instance counts, accession numbers).

Patient identifiers and names are arguments of the builders and end up **only** in
participant objects of type 1 (person), role 1 (patient), ID type RFC-3881 2 "Patient
Number" (PS3.15 A.5.2.6). :func:`redacted` removes them; the trail stores
:func:`to_dict` encrypted; :func:`to_xml` writes the DICOM audit message
(PS3.15 A.5.1 schema) for export and for ATNA forwarding.

Mapping of node stages to PS3.15 A.5.3 messages
-----------------------------------------------

=====================  ===========================================  ======  =========================================
builder                EventID (DCM)                                action  EventTypeCode
=====================  ===========================================  ======  =========================================
application_activity   110100 Application Activity (A.5.3.1)       E       110120 Application Start / 110121 Stop
association            110114 User Authentication (A.5.3.12)       E       110122 Login (outcome 0 accepted, 4 rejected)
instances_received     110104 DICOM Instances Transferred (A.5.3.7) C      --
study_completed        110103 DICOM Instances Accessed (A.5.3.5)   R       99DICOMNODE STUDY_COMPLETED
rule_matched           110103 DICOM Instances Accessed (A.5.3.5)   R       99DICOMNODE RULE_MATCHED / RULE_NO_MATCH
job                    110103 DICOM Instances Accessed (A.5.3.5)   E       99DICOMNODE JOB_STARTED/FINISHED/FAILED
result_sent            110104 DICOM Instances Transferred (A.5.3.7) C      -- (outcome 0 sent, 8 given up)
config_loaded          110113 Security Alert (A.5.3.11)            E       110131 Software Configuration
audit_log_used         110101 Audit Log Used (A.5.3.2)             R       99DICOMNODE AUDIT_EXPORT / AUDIT_VERIFY
data_purged            110105 DICOM Study Deleted (A.5.3.6)        D       99DICOMNODE RETENTION_PURGE
keys_rotated           110113 Security Alert (A.5.3.11)            E       110129 Security Configuration
=====================  ===========================================  ======  =========================================

Notes on the choices: PS3.15 has no message for "association accepted"; User
Authentication (a node logging on, successfully or not) fits better than Security Alert
/ 110126 Node Authentication, which A.5.3.11 reserves for TLS authentication failures.
Study completion, routing and model execution have no event of their own: they are uses
of received instances (A.5.3.5 "viewed, utilized, updated"), told apart by private
EventTypeCodes -- PS3.15 A.5.1 allows any coded terminology there. Results sent use
EventActionCode C: the receiver did not hold the (new) result instances (A.5.3.7).

All codes and meanings were checked against ``pydicom.sr.codedict.codes.DCM`` (DICOM
PS3.16 CID 400-404) and the PS3.15 text.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

ActionCode = Literal["C", "R", "U", "D", "E"]
Outcome = Literal[0, 4, 8, 12]

ACTION_CODES: tuple[str, ...] = ("C", "R", "U", "D", "E")
OUTCOMES: tuple[int, ...] = (0, 4, 8, 12)
"""EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure."""

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

PRIVATE_SCHEME = "99DICOMNODE"
REDACTED = "[redacted]"
BLANK_AE = "(blank)"


# --------------------------------------------------------------------------- codes


@dataclass(frozen=True)
class Code:
    """A CodedValueType of the audit schema (PS3.15 A.5.1.1).

    Written as ``csd-code``, ``codeSystemName`` and ``originalText`` (the DICOM Code
    Meaning) attributes.
    """

    code: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("code", "scheme", "meaning"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Code.{name}: must be a non-empty string, not {value!r}")


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


def _private(code: str, meaning: str) -> Code:
    return Code(code, PRIVATE_SCHEME, meaning)


# EventID, PS3.16 CID 400 "Audit Event ID"
EV_APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
EV_AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
EV_INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
EV_INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EV_STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EV_SECURITY_ALERT = _dcm("110113", "Security Alert")
EV_USER_AUTHENTICATION = _dcm("110114", "User Authentication")

# EventTypeCode, PS3.16 CID 401 "Audit Event Type Code"
ET_APPLICATION_START = _dcm("110120", "Application Start")
ET_APPLICATION_STOP = _dcm("110121", "Application Stop")
ET_LOGIN = _dcm("110122", "Login")
ET_SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
ET_SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")

# EventTypeCode, private to this node
ET_STUDY_COMPLETED = _private("STUDY_COMPLETED", "Study Completed")
ET_RULE_MATCHED = _private("RULE_MATCHED", "Routing Rule Matched")
ET_RULE_NO_MATCH = _private("RULE_NO_MATCH", "No Routing Rule Matched")
ET_JOB_STARTED = _private("JOB_STARTED", "Inference Job Started")
ET_JOB_FINISHED = _private("JOB_FINISHED", "Inference Job Finished")
ET_JOB_FAILED = _private("JOB_FAILED", "Inference Job Failed")
ET_AUDIT_EXPORT = _private("AUDIT_EXPORT", "Audit Trail Exported")
ET_AUDIT_VERIFY = _private("AUDIT_VERIFY", "Audit Trail Verified")
ET_RETENTION_PURGE = _private("RETENTION_PURGE", "Retention Purge")

# RoleIDCode, PS3.16 CID 402 "Audit Active Participant Role ID Code"
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")

# ParticipantObjectIDTypeCode: RFC 3881 values (PS3.15 A.5.1.2.4) and CID 404
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_URI = Code("12", "RFC-3881", "URI")
ID_STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
ID_SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
ID_NODE_ID = _dcm("110182", "Node ID")
ID_JOB = _private("JOB_ID", "Inference Job ID")
ID_RULE = _private("RULE", "Routing Rule Name")
ID_KEY = _private("KEY_ID", "Audit Key ID")

# ParticipantObjectTypeCode (PS3.15 A.5.1.1)
OBJ_PERSON, OBJ_SYSTEM = 1, 2
# ParticipantObjectTypeCodeRole (PS3.15 A.5.1.2.2)
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_SECURITY_RESOURCE = 1, 3, 4, 13
ROLE_JOB, ROLE_ROUTING_CRITERIA = 20, 23
# ParticipantObjectDataLifeCycle (PS3.15 A.5.1.2.3)
LIFE_CYCLE_LOGICAL_DELETION, LIFE_CYCLE_PERMANENT_ERASURE = 14, 15

# NetworkAccessPointTypeCode (PS3.15 A.5.1.1)
NAP_MACHINE_NAME, NAP_IP_ADDRESS = 1, 2
# AuditSourceTypeCode 4: "Application Server process tier in a multi-tier system"
SOURCE_TYPE_APPLICATION_SERVER = "4"


# --------------------------------------------------------------------------- model


def _require_text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, not {value!r}")
    return value


def _optional_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    return _require_text(value, name)


@dataclass(frozen=True)
class EventIdentification:
    """EventIdentification (PS3.15 A.5.1.1, A.5.2): what happened, when, with what outcome."""

    event_id: Code
    action: ActionCode
    date_time: datetime
    outcome: Outcome = SUCCESS
    type_codes: tuple[Code, ...] = ()
    outcome_description: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, Code):
            raise ValueError(f"event_id: must be a Code, not {self.event_id!r}")
        if self.action not in ACTION_CODES:
            raise ValueError(f"action: must be one of {ACTION_CODES}, not {self.action!r}")
        if not isinstance(self.date_time, datetime) or self.date_time.utcoffset() is None:
            raise ValueError(f"date_time: must be a timezone-aware datetime, not {self.date_time!r}")
        # The same instant, expressed in UTC (A.5.2.5); not a change of value.
        object.__setattr__(self, "date_time", self.date_time.astimezone(UTC))
        if isinstance(self.outcome, bool) or self.outcome not in OUTCOMES:
            raise ValueError(f"outcome: must be one of {OUTCOMES}, not {self.outcome!r}")
        object.__setattr__(self, "type_codes", tuple(self.type_codes))
        for code in self.type_codes:
            if not isinstance(code, Code):
                raise ValueError(f"type_codes: every item must be a Code, not {code!r}")
        if self.outcome_description is not None and not isinstance(self.outcome_description, str):
            raise ValueError(
                f"outcome_description: must be a string or None, not {self.outcome_description!r}"
            )


@dataclass(frozen=True)
class ActiveParticipant:
    """ActiveParticipant (PS3.15 A.5.1.1, A.5.2.1-A.5.2.3): a user, process or node."""

    user_id: str
    is_requestor: bool
    role_codes: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    network_access_point_id: str | None = None
    network_access_point_type: Literal[1, 2] | None = None

    def __post_init__(self) -> None:
        _require_text(self.user_id, "user_id")
        if not isinstance(self.is_requestor, bool):
            raise ValueError(f"is_requestor: must be a bool, not {self.is_requestor!r}")
        object.__setattr__(self, "role_codes", tuple(self.role_codes))
        for code in self.role_codes:
            if not isinstance(code, Code):
                raise ValueError(f"role_codes: every item must be a Code, not {code!r}")
        _optional_text(self.alternative_user_id, "alternative_user_id")
        _optional_text(self.user_name, "user_name")
        _optional_text(self.network_access_point_id, "network_access_point_id")
        nap_type = self.network_access_point_type
        if nap_type is not None and (isinstance(nap_type, bool) or nap_type not in (1, 2)):
            raise ValueError(f"network_access_point_type: must be 1, 2 or None, not {nap_type!r}")
        if (nap_type is None) != (self.network_access_point_id is None):
            raise ValueError(
                "network_access_point_type: must be given exactly when network_access_point_id is"
            )


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification (PS3.15 A.5.1.1, A.5.2): the system that reports the event."""

    source_id: str
    enterprise_site_id: str | None = None
    type_codes: tuple[str, ...] = (SOURCE_TYPE_APPLICATION_SERVER,)

    def __post_init__(self) -> None:
        _require_text(self.source_id, "source_id")
        _optional_text(self.enterprise_site_id, "enterprise_site_id")
        object.__setattr__(self, "type_codes", tuple(self.type_codes))
        for code in self.type_codes:
            if code not in tuple("123456789"):
                raise ValueError(f"type_codes: every item must be '1'..'9', not {code!r}")


@dataclass(frozen=True)
class SOPClass:
    """ParticipantObjectDescription/SOPClass: a SOP Class UID and how many instances."""

    number_of_instances: int
    uid: str | None = None

    def __post_init__(self) -> None:
        n = self.number_of_instances
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number_of_instances: must be an int >= 0, not {n!r}")
        _optional_text(self.uid, "uid")


@dataclass(frozen=True)
class ObjectDescription:
    """ParticipantObjectDescription (PS3.15 A.5.1.1 DICOMObjectDescriptionContents)."""

    sop_classes: tuple[SOPClass, ...] = ()
    accessions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sop_classes", tuple(self.sop_classes))
        object.__setattr__(self, "accessions", tuple(self.accessions))
        for item in self.sop_classes:
            if not isinstance(item, SOPClass):
                raise ValueError(f"sop_classes: every item must be a SOPClass, not {item!r}")
        for number in self.accessions:
            _require_text(number, "accessions")


@dataclass(frozen=True)
class ParticipantObject:
    """ParticipantObjectIdentification (PS3.15 A.5.1.1, A.5.2.6-A.5.2.8).

    ``details`` are ParticipantObjectDetail type/value pairs (values base64 in XML).
    """

    object_id: str
    id_type: Code
    type_code: Literal[1, 2, 3, 4] | None = None
    role: int | None = None
    name: str | None = None
    details: tuple[tuple[str, str], ...] = ()
    description: ObjectDescription | None = None
    life_cycle: int | None = None

    def __post_init__(self) -> None:
        _require_text(self.object_id, "object_id")
        if not isinstance(self.id_type, Code):
            raise ValueError(f"id_type: must be a Code, not {self.id_type!r}")
        if self.type_code is not None and (
            isinstance(self.type_code, bool) or self.type_code not in (1, 2, 3, 4)
        ):
            raise ValueError(f"type_code: must be 1-4 or None, not {self.type_code!r}")
        if self.role is not None and (
            isinstance(self.role, bool) or not isinstance(self.role, int) or not 1 <= self.role <= 26
        ):
            raise ValueError(f"role: must be 1-26 or None, not {self.role!r}")
        if self.life_cycle is not None and (
            isinstance(self.life_cycle, bool)
            or not isinstance(self.life_cycle, int)
            or not 1 <= self.life_cycle <= 15
        ):
            raise ValueError(f"life_cycle: must be 1-15 or None, not {self.life_cycle!r}")
        _optional_text(self.name, "name")
        object.__setattr__(self, "details", tuple(tuple(d) for d in self.details))
        for detail in self.details:
            if len(detail) != 2 or not all(isinstance(x, str) for x in detail) or not detail[0]:
                raise ValueError(f"details: every item must be a (type, value) pair, not {detail!r}")
        if self.description is not None and not isinstance(self.description, ObjectDescription):
            raise ValueError(f"description: must be an ObjectDescription, not {self.description!r}")

    @property
    def is_patient(self) -> bool:
        """Whether this object identifies a patient (its ID and name are patient identifiers)."""
        return self.role == ROLE_PATIENT or self.id_type == ID_PATIENT_NUMBER


@dataclass(frozen=True)
class AuditEvent:
    """One audit message (PS3.15 A.5.1 ``AuditMessage``)."""

    event: EventIdentification
    participants: tuple[ActiveParticipant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.event, EventIdentification):
            raise ValueError(f"event: must be an EventIdentification, not {self.event!r}")
        object.__setattr__(self, "participants", tuple(self.participants))
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.participants:
            raise ValueError("participants: an audit message needs at least one (PS3.15 A.5.1)")
        for p in self.participants:
            if not isinstance(p, ActiveParticipant):
                raise ValueError(f"participants: every item must be an ActiveParticipant, not {p!r}")
        if not isinstance(self.source, AuditSource):
            raise ValueError(f"source: must be an AuditSource, not {self.source!r}")
        for o in self.objects:
            if not isinstance(o, ParticipantObject):
                raise ValueError(f"objects: every item must be a ParticipantObject, not {o!r}")

    @property
    def event_id(self) -> Code:
        """Shorthand for ``event.event_id``."""
        return self.event.event_id

    @property
    def outcome(self) -> int:
        """Shorthand for ``event.outcome``."""
        return self.event.outcome


@dataclass(frozen=True)
class NodeIdentity:
    """Who reports: the node's AE title, host and (optional) enterprise site.

    Built once by the service and passed to every builder as ``node=``; the default (for
    tests and tools) is AE ``DICOMNODE`` on this host.
    """

    ae_title: str = "DICOMNODE"
    host: str = field(default_factory=socket.gethostname)
    site_id: str | None = None
    source_id: str | None = None

    def __post_init__(self) -> None:
        _require_text(self.ae_title, "ae_title")
        _require_text(self.host, "host")
        _optional_text(self.site_id, "site_id")
        _optional_text(self.source_id, "source_id")

    def audit_source(self) -> AuditSource:
        """The AuditSourceIdentification of this node (type 4, application server)."""
        return AuditSource(
            source_id=self.source_id or f"{self.ae_title}@{self.host}",
            enterprise_site_id=self.site_id,
        )


# --------------------------------------------------------------------------- builders


def _now(at: datetime | None) -> datetime:
    return datetime.now(UTC) if at is None else at


def _nap(address: str | None) -> tuple[str | None, Literal[1, 2] | None]:
    """NetworkAccessPointID and TypeCode (A.5.2.3): 2 for an IP address, 1 for a machine name.

    Accepts a host, ``host:port``, ``[v6]:port``, ``AE@host:port`` or a URL; only the
    host is kept.
    """
    if not address or not address.strip():
        return None, None
    host = address.strip()
    if "://" in host:
        host = urlsplit(host).hostname or host
    else:
        host = host.rsplit("@", 1)[-1]
        if host.startswith("[") and "]" in host:
            host = host[1 : host.index("]")]
        elif host.count(":") == 1:  # host:port; a bare IPv6 address keeps its colons
            host = host.split(":", 1)[0]
    if not host:
        return None, None
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return host, NAP_MACHINE_NAME
    return host, NAP_IP_ADDRESS


def _node_participant(
    node: NodeIdentity, *, requestor: bool, roles: Sequence[Code] = (ROLE_APPLICATION,)
) -> ActiveParticipant:
    return ActiveParticipant(
        user_id=node.ae_title,
        alternative_user_id=f"AETITLES={node.ae_title}",
        is_requestor=requestor,
        role_codes=tuple(roles),
        network_access_point_id=node.host,
        network_access_point_type=_nap(node.host)[1],
    )


def _peer(ae: str, address: str | None, *, requestor: bool, role: Code) -> ActiveParticipant:
    """A DIMSE or DICOMweb peer; a blank calling AE (a hostile peer) is recorded as ``(blank)``."""
    nap_id, nap_type = _nap(address)
    if not isinstance(ae, str):
        raise ValueError(f"ae: must be a string, not {ae!r}")
    ae = ae.strip() or BLANK_AE
    return ActiveParticipant(
        user_id=ae,
        alternative_user_id=f"AETITLES={ae}",
        is_requestor=requestor,
        role_codes=(role,),
        network_access_point_id=nap_id,
        network_access_point_type=nap_type,
    )


def _sop_classes(sop_classes: Mapping[str, int] | int | None) -> ObjectDescription | None:
    if sop_classes is None:
        return None
    if isinstance(sop_classes, int) and not isinstance(sop_classes, bool):
        return ObjectDescription(sop_classes=(SOPClass(number_of_instances=sop_classes),))
    if not isinstance(sop_classes, Mapping):
        raise ValueError(f"sop_classes: must be a mapping of UID to count, not {sop_classes!r}")
    return ObjectDescription(
        sop_classes=tuple(
            SOPClass(uid=uid, number_of_instances=count) for uid, count in sorted(sop_classes.items())
        )
    )


def _study(
    study_uid: str,
    *,
    sop_classes: Mapping[str, int] | int | None = None,
    details: Sequence[tuple[str, str]] = (),
    life_cycle: int | None = None,
    accession: str | None = None,
) -> ParticipantObject:
    description = _sop_classes(sop_classes)
    if accession:
        description = replace(description or ObjectDescription(), accessions=(accession,))
    return ParticipantObject(
        object_id=_require_text(study_uid, "study_uid"),
        id_type=ID_STUDY_INSTANCE_UID,
        type_code=OBJ_SYSTEM,
        role=ROLE_REPORT,
        details=tuple(details),
        description=description,
        life_cycle=life_cycle,
    )


def _patient(
    patient_id: str | None, patient_name: object | None, *, life_cycle: int | None = None
) -> tuple[ParticipantObject, ...]:
    """The patient participant object (A.5.2.6), or none when no patient ID is known."""
    if patient_id is None or not str(patient_id).strip():
        return ()
    name = None if patient_name is None else str(patient_name).strip() or None
    return (
        ParticipantObject(
            object_id=str(patient_id),
            id_type=ID_PATIENT_NUMBER,
            type_code=OBJ_PERSON,
            role=ROLE_PATIENT,
            name=name,
            life_cycle=life_cycle,
        ),
    )


def _event(
    event_id: Code,
    action: ActionCode,
    *,
    at: datetime | None,
    outcome: int = SUCCESS,
    types: Sequence[Code] = (),
    description: str | None = None,
) -> EventIdentification:
    return EventIdentification(
        event_id=event_id,
        action=action,
        date_time=_now(at),
        outcome=outcome,  # type: ignore[arg-type]  # validated in __post_init__
        type_codes=tuple(types),
        outcome_description=description,
    )


def application_activity(
    start: bool,
    node_ae: str,
    host: str,
    *,
    outcome: int = SUCCESS,
    user: str | None = None,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Application Start / Stop (PS3.15 A.5.3.1, EventID 110100, action E).

    The node is the participant with RoleIDCode 110150 Application; ``user`` (the OS
    account or service manager that started it) is added as 110151 Application Launcher.
    """
    ident = replace(node or NodeIdentity(ae_title=node_ae, host=host), ae_title=node_ae, host=host)
    participants = [_node_participant(ident, requestor=user is None)]
    if user:
        participants.append(
            ActiveParticipant(user_id=user, is_requestor=True, role_codes=(ROLE_APPLICATION_LAUNCHER,))
        )
    return AuditEvent(
        event=_event(
            EV_APPLICATION_ACTIVITY,
            "E",
            at=at,
            outcome=outcome,
            types=(ET_APPLICATION_START if start else ET_APPLICATION_STOP,),
        ),
        participants=tuple(participants),
        source=ident.audit_source(),
    )


def association(
    accepted: bool,
    calling_ae: str,
    called_ae: str,
    address: str | None,
    reason: str | None = None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """A peer's association accepted (outcome 0) or rejected (outcome 4).

    User Authentication (PS3.15 A.5.3.12, EventID 110114, type 110122 Login): the calling
    AE (Source Role ID, requestor, at ``address``) asks the node (the called AE,
    Destination Role ID) to let it in. ``reason`` becomes EventOutcomeDescription.
    """
    ident = node or NodeIdentity()
    called = replace(ident, ae_title=_require_text(called_ae, "called_ae"))
    return AuditEvent(
        event=_event(
            EV_USER_AUTHENTICATION,
            "E",
            at=at,
            outcome=SUCCESS if accepted else MINOR_FAILURE,
            types=(ET_LOGIN,),
            description=reason,
        ),
        participants=(
            _peer(calling_ae, address, requestor=True, role=ROLE_SOURCE),
            _node_participant(called, requestor=False, roles=(ROLE_DESTINATION,)),
        ),
        source=ident.audit_source(),
    )


def instances_received(
    calling_ae: str,
    address: str | None,
    node_ae: str,
    study_uid: str,
    sop_classes: Mapping[str, int],
    patient_id: str | None,
    patient_name: object | None,
    outcome: int = SUCCESS,
    *,
    description: str | None = None,
    accession: str | None = None,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Instances stored (PS3.15 A.5.3.7 DICOM Instances Transferred, 110104, action C).

    One message per study and association (or per batch), with the SOP classes and their
    instance counts in the study's ParticipantObjectDescription (A.5.2.7).
    """
    ident = replace(node or NodeIdentity(), ae_title=_require_text(node_ae, "node_ae"))
    return AuditEvent(
        event=_event(EV_INSTANCES_TRANSFERRED, "C", at=at, outcome=outcome, description=description),
        participants=(
            _peer(calling_ae, address, requestor=True, role=ROLE_SOURCE),
            _node_participant(ident, requestor=False, roles=(ROLE_DESTINATION,)),
        ),
        source=ident.audit_source(),
        objects=(
            _study(study_uid, sop_classes=sop_classes, accession=accession),
            *_patient(patient_id, patient_name),
        ),
    )


def study_completed(
    study_uid: str,
    revision: int,
    count: int,
    patient_id: str | None,
    patient_name: object | None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """A study's quiet window ended: DICOM Instances Accessed (A.5.3.5, 110103, action R).

    EventTypeCode 99DICOMNODE STUDY_COMPLETED; ``revision`` (0 first, then one more each
    time late images re-open the study) is a ParticipantObjectDetail of the study.
    """
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError(f"revision: must be an int >= 0, not {revision!r}")
    ident = node or NodeIdentity()
    return AuditEvent(
        event=_event(EV_INSTANCES_ACCESSED, "R", at=at, types=(ET_STUDY_COMPLETED,)),
        participants=(_node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            _study(study_uid, sop_classes=count, details=(("Revision", str(revision)),)),
            *_patient(patient_id, patient_name),
        ),
    )


def rule_matched(
    study_uid: str,
    rule: str | None,
    model: str | None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Routing decided (A.5.3.5, 110103, action R): RULE_MATCHED, or RULE_NO_MATCH if ``rule`` is None.

    The rule is a participant object of role 23 Routing Criteria, with the model it
    selects as a detail. "No rule matched" is a success: the node did what it was told.
    """
    ident = node or NodeIdentity()
    objects = [_study(study_uid)]
    if rule is not None:
        details = (("Model", model),) if model else ()
        objects.append(
            ParticipantObject(
                object_id=_require_text(rule, "rule"),
                id_type=ID_RULE,
                type_code=OBJ_SYSTEM,
                role=ROLE_ROUTING_CRITERIA,
                name=rule,
                details=details,
            )
        )
    return AuditEvent(
        event=_event(
            EV_INSTANCES_ACCESSED,
            "R",
            at=at,
            types=(ET_RULE_MATCHED if rule is not None else ET_RULE_NO_MATCH,),
        ),
        participants=(_node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=tuple(objects),
    )


_JOB_TYPES = {"started": ET_JOB_STARTED, "finished": ET_JOB_FINISHED, "failed": ET_JOB_FAILED}


def job(
    state: Literal["started", "finished", "failed"],
    job_id: str,
    model: str,
    version: str | None,
    study_uid: str,
    series_uid: str | None,
    error: str | None = None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """An inference job started, finished or failed (A.5.3.5, 110103, action E).

    The model is an ActiveParticipant (110150 Application, ``model@version``, or just
    ``model`` when the version is not known yet), the node
    the requestor. A failed job has outcome 8 (serious failure) and ``error`` as
    EventOutcomeDescription -- the caller must keep patient data out of it.
    """
    if state not in _JOB_TYPES:
        raise ValueError(f"state: must be one of {tuple(_JOB_TYPES)}, not {state!r}")
    ident = node or NodeIdentity()
    model = _require_text(model, "model")
    label = f"{model}@{version}" if version else model
    study_details = (("SeriesInstanceUID", series_uid),) if series_uid else ()
    return AuditEvent(
        event=_event(
            EV_INSTANCES_ACCESSED,
            "E",
            at=at,
            outcome=SERIOUS_FAILURE if state == "failed" else SUCCESS,
            types=(_JOB_TYPES[state],),
            description=error,
        ),
        participants=(
            _node_participant(ident, requestor=True),
            ActiveParticipant(
                user_id=label,
                user_name=model,
                is_requestor=False,
                role_codes=(ROLE_APPLICATION,),
            ),
        ),
        source=ident.audit_source(),
        objects=(
            _study(study_uid, details=study_details),
            ParticipantObject(
                object_id=_require_text(job_id, "job_id"),
                id_type=ID_JOB,
                type_code=OBJ_SYSTEM,
                role=ROLE_JOB,
                name=f"{model} {version}" if version else model,
            ),
        ),
    )


def result_sent(
    destination: str,
    address: str | None,
    study_uid: str,
    sop_classes: Mapping[str, int],
    sent: bool,
    reason: str | None = None,
    patient_id: str | None = None,
    patient_name: object | None = None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Results delivered (outcome 0) or given up (outcome 8): A.5.3.7, 110104, action C.

    The node is the requestor with Source Role ID, ``destination`` (an AE title or a
    STOW-RS URL) the Destination Role ID at ``address``.
    """
    ident = node or NodeIdentity()
    return AuditEvent(
        event=_event(
            EV_INSTANCES_TRANSFERRED,
            "C",
            at=at,
            outcome=SUCCESS if sent else SERIOUS_FAILURE,
            description=reason,
        ),
        participants=(
            _node_participant(ident, requestor=True, roles=(ROLE_SOURCE,)),
            _peer(destination, address, requestor=False, role=ROLE_DESTINATION),
        ),
        source=ident.audit_source(),
        objects=(
            _study(study_uid, sop_classes=sop_classes),
            *_patient(patient_id, patient_name),
        ),
    )


def config_loaded(
    path: str,
    ok: bool,
    *,
    reason: str | None = None,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Configuration loaded (or refused): Security Alert (A.5.3.11, 110113, action E).

    EventTypeCode 110131 Software Configuration; the file is the alert subject (ID type
    RFC-3881 12 URI). A refused configuration has outcome 8.
    """
    ident = node or NodeIdentity()
    return AuditEvent(
        event=_event(
            EV_SECURITY_ALERT,
            "E",
            at=at,
            outcome=SUCCESS if ok else SERIOUS_FAILURE,
            types=(ET_SOFTWARE_CONFIGURATION,),
            description=reason,
        ),
        participants=(_node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            ParticipantObject(
                object_id=_require_text(str(path), "path"),
                id_type=ID_URI,
                type_code=OBJ_SYSTEM,
                role=ROLE_SECURITY_RESOURCE,
                name="Configuration",
            ),
        ),
    )


def audit_log_used(
    action: Literal["export", "verify"],
    user: str,
    outcome: int = SUCCESS,
    *,
    log_uri: str = "dicomnode-audit-trail",
    description: str | None = None,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """The audit trail was exported or verified: Audit Log Used (A.5.3.2, 110101, action R).

    ``user`` (who ran the command) is the requestor; the trail is the participant object
    named "Security Audit Log" (A.5.3.2), identified by ``log_uri``.
    """
    types = {"export": ET_AUDIT_EXPORT, "verify": ET_AUDIT_VERIFY}
    if action not in types:
        raise ValueError(f"action: must be 'export' or 'verify', not {action!r}")
    ident = node or NodeIdentity()
    return AuditEvent(
        event=_event(
            EV_AUDIT_LOG_USED, "R", at=at, outcome=outcome, types=(types[action],),
            description=description,
        ),
        participants=(
            ActiveParticipant(user_id=_require_text(user, "user"), user_name=user, is_requestor=True),
            _node_participant(ident, requestor=False),
        ),
        source=ident.audit_source(),
        objects=(
            ParticipantObject(
                object_id=_require_text(log_uri, "log_uri"),
                id_type=ID_URI,
                type_code=OBJ_SYSTEM,
                role=ROLE_SECURITY_RESOURCE,
                name="Security Audit Log",
            ),
        ),
    )


def data_purged(
    study_uid: str,
    instances: int | Mapping[str, int],
    patient_id: str | None,
    patient_name: object | None,
    reason: str,
    *,
    outcome: int = SUCCESS,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Retention removed a study's files: DICOM Study Deleted (A.5.3.6, 110105, action D).

    ``instances`` is a count or a mapping of SOP Class UID to count; ``reason`` (e.g.
    "retention 30 days") is EventOutcomeDescription. Objects carry life cycle 15
    (permanent erasure).
    """
    ident = node or NodeIdentity()
    return AuditEvent(
        event=_event(
            EV_STUDY_DELETED,
            "D",
            at=at,
            outcome=outcome,
            types=(ET_RETENTION_PURGE,),
            description=_require_text(reason, "reason"),
        ),
        participants=(_node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            _study(study_uid, sop_classes=instances, life_cycle=LIFE_CYCLE_PERMANENT_ERASURE),
            *_patient(patient_id, patient_name, life_cycle=LIFE_CYCLE_PERMANENT_ERASURE),
        ),
    )


def keys_rotated(
    key_id: str,
    *,
    user: str | None = None,
    outcome: int = SUCCESS,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """The audit encryption key was rotated: Security Alert (A.5.3.11, 110113, action E).

    EventTypeCode 110129 Security Configuration; the new key ID (never the key) is the
    alert subject.
    """
    ident = node or NodeIdentity()
    participants = [_node_participant(ident, requestor=user is None)]
    if user:
        participants.insert(0, ActiveParticipant(user_id=user, user_name=user, is_requestor=True))
    return AuditEvent(
        event=_event(
            EV_SECURITY_ALERT, "E", at=at, outcome=outcome, types=(ET_SECURITY_CONFIGURATION,)
        ),
        participants=tuple(participants),
        source=ident.audit_source(),
        objects=(
            ParticipantObject(
                object_id=_require_text(key_id, "key_id"),
                id_type=ID_KEY,
                type_code=OBJ_SYSTEM,
                role=ROLE_SECURITY_RESOURCE,
                name="Audit Encryption Key",
            ),
        ),
    )


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


__all__ = [
    "ActiveParticipant",
    "AuditEvent",
    "AuditSource",
    "Code",
    "EventIdentification",
    "NodeIdentity",
    "ObjectDescription",
    "ParticipantObject",
    "SOPClass",
    "application_activity",
    "association",
    "audit_log_used",
    "config_loaded",
    "data_purged",
    "from_dict",
    "instances_received",
    "job",
    "keys_rotated",
    "redacted",
    "result_sent",
    "rule_matched",
    "study_completed",
    "to_dict",
    "to_xml",
]
