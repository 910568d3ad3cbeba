"""The audit message model of DICOM PS3.15 Annex A.5 (after RFC 3881), and its codes.

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

Every class validates its fields when built and raises ValueError naming the field.
The last part of this module holds the general conventions of PS3.15 A.5.2 as the
builders apply them: how the node, a DIMSE or DICOMweb peer (A.5.2.1-A.5.2.3), a study
(A.5.2.7) and a patient (A.5.2.6) become participants and participant objects.

Patient identifiers and names end up **only** in participant objects of type 1
(person), role 1 (patient), ID type RFC-3881 2 "Patient Number" (PS3.15 A.5.2.6), made
by :func:`patient_objects`; :func:`dicomnode.audit.codec.redacted` removes them.

The message builders, one per node stage (PS3.15 A.5.3), are in
:mod:`dicomnode.audit.events`; the JSON and XML forms in :mod:`dicomnode.audit.codec`.
All codes and meanings were checked against ``pydicom.sr.codedict.codes.DCM`` (DICOM
PS3.16 CID 400-404) and the PS3.15 text.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import urlsplit

ActionCode = Literal["C", "R", "U", "D", "E"]
Outcome = Literal[0, 4, 8, 12]

ACTION_CODES: tuple[str, ...] = ("C", "R", "U", "D", "E")
OUTCOMES: tuple[int, ...] = (0, 4, 8, 12)
"""EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure."""

SUCCESS: Final = 0
MINOR_FAILURE: Final = 4
SERIOUS_FAILURE: Final = 8
MAJOR_FAILURE: Final = 12

PRIVATE_SCHEME = "99DICOMNODE"
BLANK_AE = "(blank)"
"""UserID of a peer that sent a blank calling AE title (a hostile peer)."""


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
OBJ_PERSON: Final = 1
OBJ_SYSTEM: Final = 2
# ParticipantObjectTypeCodeRole (PS3.15 A.5.1.2.2)
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_SECURITY_RESOURCE = 1, 3, 4, 13
ROLE_JOB, ROLE_ROUTING_CRITERIA = 20, 23
# ParticipantObjectDataLifeCycle (PS3.15 A.5.1.2.3)
LIFE_CYCLE_LOGICAL_DELETION, LIFE_CYCLE_PERMANENT_ERASURE = 14, 15

# NetworkAccessPointTypeCode (PS3.15 A.5.1.1)
NAP_MACHINE_NAME: Final = 1
NAP_IP_ADDRESS: Final = 2
# AuditSourceTypeCode 4: "Application Server process tier in a multi-tier system"
SOURCE_TYPE_APPLICATION_SERVER = "4"


# --------------------------------------------------------------------------- model


def require_text(value: object, name: str) -> str:
    """``value`` if it is a non-blank string; else ValueError naming ``name``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, not {value!r}")
    return value


def optional_text(value: object, name: str) -> str | None:
    """None, or ``value`` if it is a non-blank string; else ValueError naming ``name``."""
    if value is None:
        return None
    return require_text(value, name)


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
        require_text(self.user_id, "user_id")
        if not isinstance(self.is_requestor, bool):
            raise ValueError(f"is_requestor: must be a bool, not {self.is_requestor!r}")
        object.__setattr__(self, "role_codes", tuple(self.role_codes))
        for code in self.role_codes:
            if not isinstance(code, Code):
                raise ValueError(f"role_codes: every item must be a Code, not {code!r}")
        optional_text(self.alternative_user_id, "alternative_user_id")
        optional_text(self.user_name, "user_name")
        optional_text(self.network_access_point_id, "network_access_point_id")
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
        require_text(self.source_id, "source_id")
        optional_text(self.enterprise_site_id, "enterprise_site_id")
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
        optional_text(self.uid, "uid")


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
            require_text(number, "accessions")


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
        require_text(self.object_id, "object_id")
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
        optional_text(self.name, "name")
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
        require_text(self.ae_title, "ae_title")
        require_text(self.host, "host")
        optional_text(self.site_id, "site_id")
        optional_text(self.source_id, "source_id")

    def audit_source(self) -> AuditSource:
        """The AuditSourceIdentification of this node (type 4, application server)."""
        return AuditSource(
            source_id=self.source_id or f"{self.ae_title}@{self.host}",
            enterprise_site_id=self.site_id,
        )

# --------------------------------------------------------------------------- A.5.2 conventions
#
# How the builders (dicomnode.audit.events) fill participants and participant objects.


def network_access_point(address: str | None) -> tuple[str | None, Literal[1, 2] | None]:
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


def node_participant(
    node: NodeIdentity, *, requestor: bool, roles: Sequence[Code] = (ROLE_APPLICATION,)
) -> ActiveParticipant:
    """The node as an ActiveParticipant (A.5.2.1-A.5.2.3): its AE title, at its host."""
    return ActiveParticipant(
        user_id=node.ae_title,
        alternative_user_id=f"AETITLES={node.ae_title}",
        is_requestor=requestor,
        role_codes=tuple(roles),
        network_access_point_id=node.host,
        network_access_point_type=network_access_point(node.host)[1],
    )


def peer_participant(
    ae: str, address: str | None, *, requestor: bool, role: Code
) -> ActiveParticipant:
    """A DIMSE or DICOMweb peer; a blank calling AE (a hostile peer) is recorded as ``(blank)``."""
    nap_id, nap_type = network_access_point(address)
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


def object_description(sop_classes: Mapping[str, int] | int | None) -> ObjectDescription | None:
    """ParticipantObjectDescription of a study (A.5.2.7): SOP Class UIDs and instance counts.

    A bare count gives one SOPClass entry without a UID; None gives no description.
    """
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


def study_object(
    study_uid: str,
    *,
    sop_classes: Mapping[str, int] | int | None = None,
    details: Sequence[tuple[str, str]] = (),
    life_cycle: int | None = None,
    accession: str | None = None,
) -> ParticipantObject:
    """A study as a participant object (A.5.2.7): system object, role 3 Report, ID type 110180."""
    description = object_description(sop_classes)
    if accession:
        description = replace(description or ObjectDescription(), accessions=(accession,))
    return ParticipantObject(
        object_id=require_text(study_uid, "study_uid"),
        id_type=ID_STUDY_INSTANCE_UID,
        type_code=OBJ_SYSTEM,
        role=ROLE_REPORT,
        details=tuple(details),
        description=description,
        life_cycle=life_cycle,
    )


def patient_objects(
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
