"""Audit events of the node: one builder per stage, each a DICOM audit message (PS3.15 A.5.3).

Every builder returns an :class:`AuditEvent`, the PS3.15 A.5.1 message model (after
RFC 3881) of :mod:`dicomnode.audit.model`. Stages call them through their recorder,
``audit.record(events.association, ...)``, which passes the reporting
:class:`NodeIdentity` as ``node=``, stores :func:`to_dict` encrypted in the trail and
forwards :func:`to_xml` (the PS3.15 A.5.1 schema) to an ATNA repository; both forms are
in :mod:`dicomnode.audit.codec`.

Patient identifiers and names are arguments of the builders and end up **only** in
participant objects of type 1 (person), role 1 (patient), ID type RFC-3881 2 "Patient
Number" (PS3.15 A.5.2.6). :func:`redacted` removes them.

This module is the public face of audit events: the model's classes and the codec's
functions are re-exported here (see ``__all__``), so ``events`` is the one name a caller
needs. Modules of the audit package import them from where they are defined.

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
PS3.16 CID 400-404) and the PS3.15 text; they are defined in :mod:`dicomnode.audit.model`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal, cast

from dicomnode.audit.codec import REDACTED, format_datetime, from_dict, redacted, to_dict, to_xml
from dicomnode.audit.model import (
    BLANK_AE,
    ET_APPLICATION_START,
    ET_APPLICATION_STOP,
    ET_AUDIT_EXPORT,
    ET_AUDIT_VERIFY,
    ET_JOB_FAILED,
    ET_JOB_FINISHED,
    ET_JOB_STARTED,
    ET_LOGIN,
    ET_RETENTION_PURGE,
    ET_RULE_MATCHED,
    ET_RULE_NO_MATCH,
    ET_SECURITY_CONFIGURATION,
    ET_SOFTWARE_CONFIGURATION,
    ET_STUDY_COMPLETED,
    EV_APPLICATION_ACTIVITY,
    EV_AUDIT_LOG_USED,
    EV_INSTANCES_ACCESSED,
    EV_INSTANCES_TRANSFERRED,
    EV_SECURITY_ALERT,
    EV_STUDY_DELETED,
    EV_USER_AUTHENTICATION,
    ID_JOB,
    ID_KEY,
    ID_RULE,
    ID_URI,
    LIFE_CYCLE_PERMANENT_ERASURE,
    MAJOR_FAILURE,
    MINOR_FAILURE,
    OBJ_SYSTEM,
    ROLE_APPLICATION,
    ROLE_APPLICATION_LAUNCHER,
    ROLE_DESTINATION,
    ROLE_JOB,
    ROLE_ROUTING_CRITERIA,
    ROLE_SECURITY_RESOURCE,
    ROLE_SOURCE,
    SERIOUS_FAILURE,
    SUCCESS,
    ActionCode,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    Code,
    EventIdentification,
    NodeIdentity,
    ObjectDescription,
    Outcome,
    ParticipantObject,
    SOPClass,
    node_participant,
    patient_objects,
    peer_participant,
    require_text,
    study_object,
)

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- builders


def _now(at: datetime | None) -> datetime:
    return datetime.now(UTC) if at is None else at


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
        outcome=cast(Outcome, outcome),  # validated in __post_init__
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
    participants = [node_participant(ident, requestor=user is None)]
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
    called = replace(ident, ae_title=require_text(called_ae, "called_ae"))
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
            peer_participant(calling_ae, address, requestor=True, role=ROLE_SOURCE),
            node_participant(called, requestor=False, roles=(ROLE_DESTINATION,)),
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
    ident = replace(node or NodeIdentity(), ae_title=require_text(node_ae, "node_ae"))
    return AuditEvent(
        event=_event(EV_INSTANCES_TRANSFERRED, "C", at=at, outcome=outcome, description=description),
        participants=(
            peer_participant(calling_ae, address, requestor=True, role=ROLE_SOURCE),
            node_participant(ident, requestor=False, roles=(ROLE_DESTINATION,)),
        ),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid, sop_classes=sop_classes, accession=accession),
            *patient_objects(patient_id, patient_name),
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
        participants=(node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid, sop_classes=count, details=(("Revision", str(revision)),)),
            *patient_objects(patient_id, patient_name),
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
    objects = [study_object(study_uid)]
    if rule is not None:
        details = (("Model", model),) if model else ()
        objects.append(
            ParticipantObject(
                object_id=require_text(rule, "rule"),
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
        participants=(node_participant(ident, requestor=True),),
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
    model = require_text(model, "model")
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
            node_participant(ident, requestor=True),
            ActiveParticipant(
                user_id=label,
                user_name=model,
                is_requestor=False,
                role_codes=(ROLE_APPLICATION,),
            ),
        ),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid, details=study_details),
            ParticipantObject(
                object_id=require_text(job_id, "job_id"),
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
            node_participant(ident, requestor=True, roles=(ROLE_SOURCE,)),
            peer_participant(destination, address, requestor=False, role=ROLE_DESTINATION),
        ),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid, sop_classes=sop_classes),
            *patient_objects(patient_id, patient_name),
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
        participants=(node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            ParticipantObject(
                object_id=require_text(str(path), "path"),
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
            ActiveParticipant(user_id=require_text(user, "user"), user_name=user, is_requestor=True),
            node_participant(ident, requestor=False),
        ),
        source=ident.audit_source(),
        objects=(
            ParticipantObject(
                object_id=require_text(log_uri, "log_uri"),
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
            description=require_text(reason, "reason"),
        ),
        participants=(node_participant(ident, requestor=True),),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid, sop_classes=instances, life_cycle=LIFE_CYCLE_PERMANENT_ERASURE),
            *patient_objects(patient_id, patient_name, life_cycle=LIFE_CYCLE_PERMANENT_ERASURE),
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
    participants = [node_participant(ident, requestor=user is None)]
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
                object_id=require_text(key_id, "key_id"),
                id_type=ID_KEY,
                type_code=OBJ_SYSTEM,
                role=ROLE_SECURITY_RESOURCE,
                name="Audit Encryption Key",
            ),
        ),
    )



__all__ = [
    # the model (dicomnode.audit.model)
    "ActiveParticipant",
    "AuditEvent",
    "AuditSource",
    "BLANK_AE",
    "Code",
    "EventIdentification",
    "MAJOR_FAILURE",
    "MINOR_FAILURE",
    "NodeIdentity",
    "ObjectDescription",
    "ParticipantObject",
    "SERIOUS_FAILURE",
    "SOPClass",
    "SUCCESS",
    # the builders (this module)
    "application_activity",
    "association",
    "audit_log_used",
    "config_loaded",
    "data_purged",
    "instances_received",
    "job",
    "keys_rotated",
    "result_sent",
    "rule_matched",
    "study_completed",
    # the codec (dicomnode.audit.codec)
    "REDACTED",
    "format_datetime",
    "from_dict",
    "redacted",
    "to_dict",
    "to_xml",
]
