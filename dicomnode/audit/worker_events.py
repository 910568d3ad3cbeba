"""Audit messages about remote workers (PS3.15 A.5), built like those of ``events``.

* :func:`volume_sent` -- a worker fetched a job's de-identified volume: DICOM Instances
  Transferred (A.5.3.7, EventID 110104, action R). The node is the Source, the worker
  the Destination (its name and network address); the objects are the study (the
  instances' origin, never sent) and the job. No patient participant: nothing that
  identifies the patient left.
* :func:`worker_refused` -- a request to the worker API with no or a wrong token: User
  Authentication (A.5.3.12, 110114, action E, Login) with outcome 4.
"""

from __future__ import annotations

from datetime import datetime

from dicomnode.audit.events import _event
from dicomnode.audit.model import (
    ET_LOGIN,
    EV_INSTANCES_TRANSFERRED,
    EV_USER_AUTHENTICATION,
    ID_JOB,
    MINOR_FAILURE,
    OBJ_SYSTEM,
    ROLE_DESTINATION,
    ROLE_JOB,
    ROLE_SOURCE,
    SERIOUS_FAILURE,
    SUCCESS,
    ActiveParticipant,
    AuditEvent,
    NodeIdentity,
    ParticipantObject,
    network_access_point,
    node_participant,
    require_text,
    study_object,
)


def _worker(worker: str, address: str | None) -> ActiveParticipant:
    nap_id, nap_type = network_access_point(address)
    name = require_text(worker, "worker")
    return ActiveParticipant(
        user_id=name,
        user_name=name,
        is_requestor=True,
        role_codes=(ROLE_DESTINATION,),
        network_access_point_id=nap_id,
        network_access_point_type=nap_type,
    )


def volume_sent(
    worker: str,
    address: str | None,
    study_uid: str,
    job_id: str,
    model: str,
    slices: int,
    sent: bool = True,
    reason: str | None = None,
    *,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """A job's de-identified volume (``slices`` slices) went to ``worker`` (outcome 0), or
    was refused it (outcome 8, ``reason``: no patient data in it)."""
    ident = node or NodeIdentity()
    description = reason if reason else f"de-identified volume, {int(slices)} slices, for {model}"
    return AuditEvent(
        event=_event(EV_INSTANCES_TRANSFERRED, "R", at=at,
                     outcome=SUCCESS if sent else SERIOUS_FAILURE, description=description),
        participants=(
            node_participant(ident, requestor=False, roles=(ROLE_SOURCE,)),
            _worker(worker, address),
        ),
        source=ident.audit_source(),
        objects=(
            study_object(study_uid),
            ParticipantObject(object_id=require_text(job_id, "job_id"), id_type=ID_JOB,
                              type_code=OBJ_SYSTEM,
                              role=ROLE_JOB, name=model),
        ),
    )


def worker_refused(address: str | None, reason: str, *, node: NodeIdentity | None = None,
                   at: datetime | None = None) -> AuditEvent:
    """A request to the worker API refused for its token (outcome 4)."""
    ident = node or NodeIdentity()
    nap_id, nap_type = network_access_point(address)
    return AuditEvent(
        event=_event(EV_USER_AUTHENTICATION, "E", at=at, outcome=MINOR_FAILURE,
                     types=(ET_LOGIN,), description=reason),
        participants=(
            node_participant(ident, requestor=False),
            ActiveParticipant(user_id="worker", is_requestor=True,
                              network_access_point_id=nap_id,
                              network_access_point_type=nap_type),
        ),
        source=ident.audit_source(),
    )
