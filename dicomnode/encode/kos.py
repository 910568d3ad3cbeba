"""Rejection notes: Key Object Selection Documents that withdraw earlier results (IHE IOCM).

When a new revision of a study's results replaces earlier ones, or an operator
withdraws results by hand, each destination that received the earlier objects gets a
*rejection note*: a Key Object Selection Document (PS3.3 A.35.4, SOP class
1.2.840.10008.5.1.4.1.1.88.59) whose document title is a code of CID 7011 "Rejected
for Quality Reasons" (113001, DCM) by default, and whose content (TID 2010 "Key
Object Selection", PS3.16) references every rejected instance. IHE Radiology IOCM
(RAD-66 "Rejection Note Stored") tells an image manager to hide the referenced
instances from regular use.

:func:`encode_rejection_note` makes one with highdicom (``highdicom.ko``):

* the Current Requested Procedure Evidence Sequence (Key Object Document Module,
  PS3.3 C.17.6.2) lists each rejected instance by study, series, SOP class and
  SOP instance; the content tree lists the same instances as IMAGE (images: SEG,
  secondary capture) or COMPOSITE (SR, presentation states) content items
  (concept name (260753009, SCT, "Source"), relationship CONTAINS);
* the document title code carries no Coding Scheme Version (some archives do not
  recognise a rejection note that has one);
* an optional Key Object Description (113012, DCM) says why, in the operator's or
  the node's words;
* the observer is the model (or the node) as a device (TID 1002 / TID 1004) and
  Contributing Equipment names it (IHE AIR, see :mod:`dicomnode.encode.equipment`);
* same study as the rejected objects, a series of its own (Modality KO, Series
  Number :data:`KOS_SERIES_NUMBER`), Patient and Study modules copied from a header
  of the study (``header``);
* its UIDs (:func:`rejection_note_uids`) are a pure function of the destination, the
  title and the set of rejected instances: building the same note again after a
  crash or a retry makes the very same instance, so the outbox and the peer store it
  once.

:func:`read_rejection_note` reads one back (``highdicom.ko.KeyObjectSelectionDocument
.from_dataset``) into its title and references; the tests and ``dicomnode results``
use it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import dicomnode
from dicomnode.core.manifest import Manifest
from dicomnode.encode import equipment as eq
from dicomnode.encode.base import derived_uid
from dicomnode.encode.seg import quiet_person_name_warning
from dicomnode.encode.validate import EncodingError

logger = logging.getLogger(__name__)

KEY_OBJECT_SELECTION_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
#: Series Number of a rejection note series (results use 10000-40000 + source).
KOS_SERIES_NUMBER = 50000

#: Document titles of CID 7011 "Rejected for Quality Reasons" and its siblings
#: (PS3.16 CID 7011 "Rejection Note Document Titles"; IHE RAD TF-3 4.66).
QUALITY = Code("113001", "DCM", "Rejected for Quality Reasons")
PATIENT_SAFETY = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
INCORRECT_WORKLIST = Code("113038", "DCM", "Incorrect Modality Worklist Entry")
RETENTION_EXPIRED = Code("113039", "DCM", "Data Retention Policy Expired")
REJECTION_TITLES: dict[str, Code] = {
    "quality": QUALITY,
    "patient-safety": PATIENT_SAFETY,
    "incorrect-worklist": INCORRECT_WORKLIST,
    "retention-expired": RETENTION_EXPIRED,
}

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# SOP classes referenced as COMPOSITE rather than IMAGE content items (TID 2010 row 2/3):
# structured reports, presentation states, key object selections, encapsulated documents,
# registrations, fiducials, raw data, real world value maps, surfaces, measurements.
_COMPOSITE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",   # SR, KOS
    "1.2.840.10008.5.1.4.1.1.11.",   # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.66.1",  # spatial registration
    "1.2.840.10008.5.1.4.1.1.66.2",  # spatial fiducials
    "1.2.840.10008.5.1.4.1.1.66.3",  # deformable registration
    "1.2.840.10008.5.1.4.1.1.66.5",  # surface segmentation
    "1.2.840.10008.5.1.4.1.1.67",    # real world value mapping
)
_COMPOSITE_EXACT = frozenset({"1.2.840.10008.5.1.4.1.1.66"})  # raw data

# Patient, Clinical Trial Subject, General Study and Patient Study attributes a rejection
# note takes from a header of the study (PS3.3 A.35.4 modules; highdicom copies the rest).
_PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


def _check_uid(value: str, name: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
        raise ValueError(f"{name}: {value!r} is not a valid DICOM UID")
    return value


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """One instance a rejection note withdraws: its study, series, SOP class and UID."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("study_uid", "series_uid", "sop_class_uid", "sop_instance_uid"):
            _check_uid(getattr(self, name), name)

    @property
    def is_image(self) -> bool:
        """Whether TID 2010 references it as an IMAGE (else COMPOSITE) content item."""
        uid = self.sop_class_uid
        return uid not in _COMPOSITE_EXACT and not uid.startswith(_COMPOSITE_PREFIXES)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> RejectedInstance:
        """The reference to a dataset (or header) of an object to reject."""
        return cls(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID))


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Who withdraws: a model (name and version) or, by default, the node itself."""

    name: str = "dicomnode"
    version: str = dicomnode.__version__

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: must be a non-empty string, not {self.name!r}")
        if not isinstance(self.version, str) or not self.version.strip():
            raise ValueError(f"version: must be a non-empty string, not {self.version!r}")

    def as_manifest(self) -> Manifest:
        """The identity in the shape :mod:`dicomnode.encode.equipment` reads (it uses the
        manifest's ``name`` and ``version`` only)."""
        return cast(Manifest, self)


def rejection_note_uids(destination: str, title: Code,
                        rejected: Iterable[RejectedInstance]) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the note that rejects ``rejected`` for
    ``destination``: the same set, title and destination always give the same UIDs."""
    uids = sorted({r.sop_instance_uid for r in rejected})
    if not uids:
        raise ValueError("rejected: at least one instance is needed")
    study = sorted({r.study_uid for r in rejected})
    key = ("dicomnode-rejection", destination, title.value, title.scheme_designator,
           *study, *uids)
    return derived_uid(*key, "series"), derived_uid(*key, "instance")


def _stubs(rejected: Sequence[RejectedInstance], header: Dataset) -> list[Dataset]:
    """Evidence datasets for highdicom: the study's patient/study attributes and each
    instance's UIDs (Rows/Columns mark an image, which highdicom references as IMAGE)."""
    out = []
    for r in rejected:
        ds = Dataset()
        for keyword in _PATIENT_STUDY:
            if keyword in header:
                ds[keyword] = header[keyword]
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyID", "AccessionNumber", "StudyDate", "StudyTime"):
            if keyword not in ds:
                setattr(ds, keyword, None)  # Type 2: present, empty
        ds.StudyInstanceUID = r.study_uid
        ds.SeriesInstanceUID = r.series_uid
        ds.SOPClassUID = r.sop_class_uid
        ds.SOPInstanceUID = r.sop_instance_uid
        if r.is_image:
            ds.Rows = 1
            ds.Columns = 1
        out.append(ds)
    return out


def encode_rejection_note(
    rejected: Sequence[RejectedInstance],
    header: Dataset,
    *,
    destination: str,
    title: Code = QUALITY,
    identity: ModelIdentity | None = None,
    description: str | None = None,
) -> Dataset:
    """A Key Object Selection rejection note withdrawing ``rejected`` (module docstring).

    ``header``: any dataset (or header) of the study, for the Patient and Study modules.
    ``destination`` takes part in the UIDs (one note per destination and set).
    ``title``: one of :data:`REJECTION_TITLES`. ``description``: the reason, as the Key
    Object Description (shown by viewers; keep patient identifiers out of it).
    """
    problems = []
    rejected = list(dict.fromkeys(rejected))  # unique, in order
    if not rejected:
        problems.append("rejected: at least one instance is needed")
    studies = {r.study_uid for r in rejected}
    if len(studies) > 1:
        problems.append(f"rejected: instances of {len(studies)} studies; a rejection note covers one")
    if rejected and str(header.get("StudyInstanceUID", "")) not in studies:
        problems.append("header: belongs to another study than the rejected instances")
    if title not in REJECTION_TITLES.values():
        problems.append(f"title: {title.value} is not a rejection note title of CID 7011")
    if description is not None and (not description.strip() or len(description) > 1024):
        problems.append("description: must be 1-1024 characters")
    if problems:
        raise EncodingError(problems, what="rejection note input")
    who = identity or ModelIdentity()
    manifest = who.as_manifest()
    series_uid, sop_uid = rejection_note_uids(destination, title, rejected)
    content = hd.ko.KeyObjectSelection(
        document_title=hd.sr.CodedConcept(title.value, title.scheme_designator, title.meaning),
        referenced_objects=_stubs(rejected, header),
        observer_device_context=eq.device_observer(manifest),
        description=description,
    )
    charset: str | list[str] | None = header.get("SpecificCharacterSet")
    if description is not None and not description.isascii():
        charset = "ISO_IR 192"
    with quiet_person_name_warning():
        note = hd.ko.KeyObjectSelectionDocument(
            evidence=_stubs(rejected, header),
            content=content,
            series_instance_uid=series_uid,
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=eq.MANUFACTURER,
            contributing_equipment=[eq.contributing_equipment(manifest)],
            specific_character_set=charset,
        )
    note.SeriesDescription = eq.lo(f"{title.meaning} ({eq.model_title(manifest)})")
    note.ManufacturerModelName = eq.lo(who.name)
    note.SoftwareVersions = eq.software_versions(manifest)  # type: ignore[assignment]
    note.DeviceSerialNumber = eq.device_serial_number(manifest)
    for item in note.CurrentRequestedProcedureEvidenceSequence:
        for series in item.ReferencedSeriesSequence:
            # the Hierarchical SOP Instance Reference Macro (PS3.3 C.17.2.2): no Rows there
            for ref in series.ReferencedSOPSequence:
                for keyword in ("Rows", "Columns"):
                    if keyword in ref:
                        del ref[keyword]
    return note


@dataclass(frozen=True, slots=True)
class RejectionNote:
    """A rejection note read back: its UIDs, title, description and references."""

    sop_instance_uid: str
    study_uid: str
    title: Code
    description: str | None
    rejected: tuple[RejectedInstance, ...]


def read_rejection_note(source: Dataset | str | os.PathLike[str]) -> RejectionNote:
    """Parse a Key Object Selection rejection note (highdicom), checking that its title
    is one of CID 7011 and that every content reference has its evidence."""
    ds = source if isinstance(source, Dataset) else pydicom.dcmread(Path(source))
    try:
        doc = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        raise EncodingError([f"not a Key Object Selection Document: {exc}"],
                            what="rejection note") from exc
    concept = doc.ConceptNameCodeSequence[0]
    title = Code(str(concept.CodeValue), str(concept.CodingSchemeDesignator),
                 str(concept.CodeMeaning))
    if title not in REJECTION_TITLES.values():
        raise EncodingError([f"title ({title.value}, {title.scheme_designator}) is not a "
                             "rejection note title of CID 7011"], what="rejection note")
    description = None
    refs: list[RejectedInstance] = []
    for item in doc.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (str(name.CodeValue), str(name.CodingSchemeDesignator)) == ("113012", "DCM"):
            description = str(item.TextValue)
        if "ReferencedSOPSequence" in item:
            ref = item.ReferencedSOPSequence[0]
            study, series, sop = doc.resolve_reference(str(ref.ReferencedSOPInstanceUID))
            refs.append(RejectedInstance(study, series, str(ref.ReferencedSOPClassUID), sop))
    if not refs:
        raise EncodingError(["references no instance"], what="rejection note")
    return RejectionNote(str(doc.SOPInstanceUID), str(doc.StudyInstanceUID), title,
                         description, tuple(refs))


#: The device observer code, for tests and readers.
DEVICE = codes.DCM.Device
