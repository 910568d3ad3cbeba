"""The audit event of a withdrawal of results (IHE IOCM rejection notes sent).

Kept apart from :mod:`dicomnode.audit.events` (one builder, built only from that
module's public model) so that it survives the split of that module into model,
builders and codec unchanged but for its imports.

PS3.15 A.5.3 has no message for "results withdrawn"; the results stay stored but are
hidden (a logical deletion), which is a use of the study's instances:
DICOM Instances Accessed (A.5.3.5, EventID 110103) with EventActionCode U (update),
EventTypeCode ``99DICOMNODE RESULTS_WITHDRAWN``, and ParticipantObjectDataLifeCycle 14
"Logical deletion" (A.5.1.2.3) on the study. The destinations that received a rejection
note are ParticipantObjectDetails of the study (``Destination``); the reason is the
EventOutcomeDescription. A withdrawal by hand names the operator as the requestor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from dicomnode.audit.model import (
    EV_INSTANCES_ACCESSED,
    ID_STUDY_INSTANCE_UID,
    LIFE_CYCLE_LOGICAL_DELETION,
    PRIVATE_SCHEME,
    ROLE_APPLICATION,
    ROLE_REPORT,
    SUCCESS,
    ActiveParticipant,
    AuditEvent,
    Code,
    EventIdentification,
    NodeIdentity,
    ObjectDescription,
    ParticipantObject,
    SOPClass,
)

ET_RESULTS_WITHDRAWN = Code("RESULTS_WITHDRAWN", PRIVATE_SCHEME, "Results Withdrawn")


def results_withdrawn(
    study_uid: str,
    sop_classes: Mapping[str, int],
    destinations: Sequence[str],
    reason: str,
    user: str | None = None,
    *,
    outcome: int = SUCCESS,
    node: NodeIdentity | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Results of ``study_uid`` withdrawn (see the module docstring).

    ``sop_classes``: SOP Class UID -> number of withdrawn instances. ``destinations``:
    the destinations sent a rejection note. ``user``: who withdrew them by hand (None:
    the node did, replacing them by a new revision). ``reason`` must not hold patient
    identifiers (it is EventOutcomeDescription).
    """
    if not isinstance(study_uid, str) or not study_uid.strip():
        raise ValueError(f"study_uid: must be a non-empty string, not {study_uid!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason: must be a non-empty string, not {reason!r}")
    ident = node or NodeIdentity()
    node_participant = ActiveParticipant(
        user_id=ident.ae_title,
        alternative_user_id=f"AETITLES={ident.ae_title}",
        is_requestor=user is None,
        role_codes=(ROLE_APPLICATION,),
    )
    participants = [node_participant]
    if user:
        participants.insert(0, ActiveParticipant(user_id=user, user_name=user, is_requestor=True))
    study = ParticipantObject(
        object_id=study_uid,
        id_type=ID_STUDY_INSTANCE_UID,
        type_code=2,  # OBJ_SYSTEM
        role=ROLE_REPORT,
        details=tuple(("Destination", d) for d in destinations),
        description=ObjectDescription(sop_classes=tuple(
            SOPClass(uid=uid, number_of_instances=n) for uid, n in sorted(sop_classes.items()))),
        life_cycle=LIFE_CYCLE_LOGICAL_DELETION,
    )
    return AuditEvent(
        event=EventIdentification(
            event_id=EV_INSTANCES_ACCESSED,
            action="U",
            date_time=at or datetime.now(UTC),
            outcome=outcome,  # type: ignore[arg-type]  # validated in __post_init__
            type_codes=(ET_RESULTS_WITHDRAWN,),
            outcome_description=reason,
        ),
        participants=tuple(participants),
        source=ident.audit_source(),
        objects=(study,),
    )
