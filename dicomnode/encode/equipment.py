"""Model identity as DICOM: who made a result, with which model and version.

IHE Radiology AI Results (AIR) asks every result to carry the identity of the
algorithm that made it. Here that identity takes four DICOM forms, all derived
from the model's manifest (name, version, family) and nothing else, so that a
re-run makes the same identity:

* General Equipment / Enhanced General Equipment (PS3.3 C.7.5.1, C.7.5.2):
  Manufacturer ``dicomnode``, Manufacturer's Model Name = model name, Software
  Versions = dicomnode and model versions, Device Serial Number = derived.
* Contributing Equipment Sequence item (PS3.3 C.12.1.1.5, SOP Common):
  Purpose of Reference (109102, DCM, "Processing Equipment") from CID 7005. A
  result is a *new* object made by processing the source images; "Modifying
  Equipment" (109103) is for equipment that changed an existing instance (e.g.
  coerced attributes), so it is not used here.
* Segment Algorithm Identification (PS3.3 C.8.20.2 / Algorithm Identification
  Macro, Table 10-19): name, version and family from CID 7162 "Artificial
  Intelligence" (123110, DCM) (pydicom ``codes.cid7162.ArtificialIntelligence``).
* The SR device observer (TID 1004 "Device Observer Identifying Attributes") and
  TID 4019 "Algorithm Identification" for measurements.
"""

from __future__ import annotations

import re

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import dicomnode
from dicomnode.core.manifest import Manifest
from dicomnode.encode.base import derived_uid

MANUFACTURER = "dicomnode"

#: Algorithm family of every model (PS3.16 CID 7162).
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

#: Series Number of a result = source SeriesNumber (mod 10000) + this offset per kind,
#: so that a viewer lists each result series after its source. GSPS uses 30000
#: (``dicomnode.encode.gsps.GSPS_SERIES_OFFSET``).
SERIES_OFFSETS = {"seg": 10000, "sr": 20000, "gsps": 30000, "sc": 40000}


def model_title(manifest: Manifest) -> str:
    """The model's name and version, as shown to people: ``lung_density 1.0.0``."""
    return f"{manifest.name} {manifest.version}"


def software_versions(manifest: Manifest) -> list[str]:
    """Software Versions (0018,1020): dicomnode's and the model's."""
    return [f"dicomnode {dicomnode.__version__}", f"{manifest.name} {manifest.version}"]


def device_serial_number(manifest: Manifest) -> str:
    """A Device Serial Number (LO) that names the model and version, e.g. ``lung_density-1.0.0``."""
    return lo(f"{manifest.name}-{manifest.version}")


def device_uid(manifest: Manifest) -> str:
    """The model as a device (TID 1004 Device Observer UID): one UID per name and version."""
    return derived_uid("dicomnode-device", manifest.name, manifest.version)


def content_label(manifest: Manifest) -> str:
    """A Content Label (CS, 16 chars of A-Z 0-9 _ space) from the model's name."""
    return re.sub(r"[^A-Z0-9_ ]", "_", manifest.name.upper())[:16] or "DICOMNODE"


def series_number(source: Dataset, kind: str) -> int:
    """Series Number of the ``kind`` result of ``source``'s series (see ``SERIES_OFFSETS``)."""
    if kind not in SERIES_OFFSETS:
        raise ValueError(f"kind: unknown result kind {kind!r}; expected one of {sorted(SERIES_OFFSETS)}")
    src = source.get("SeriesNumber")
    return SERIES_OFFSETS[kind] + (int(src) % 10000 if src not in (None, "") else 0)


def algorithm_identification(manifest: Manifest) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 Table 10-19) of a segment."""
    return hd.AlgorithmIdentificationSequence(
        name=lo(manifest.name),
        family=ALGORITHM_FAMILY,
        version=lo(manifest.version),
        source=MANUFACTURER,
    )


def sr_algorithm_id(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification, for SR measurement groups."""
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, family=ALGORITHM_FAMILY,
        manufacturer=MANUFACTURER,
    )


def contributing_equipment(manifest: Manifest, device: str | None = None) -> hd.ContributingEquipment:
    """Contributing Equipment item naming dicomnode and the model (PS3.3 C.12.1, IHE AIR)."""
    where = f" on {device}" if device else ""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=lo(manifest.name),
        software_versions=software_versions(manifest),
        device_serial_number=device_serial_number(manifest),
        contribution_description=lo(f"{model_title(manifest)}{where}; not for diagnostic use"),
    )


def device_observer(manifest: Manifest) -> hd.sr.ObserverContext:
    """The model as the SR's observer (TID 1002 with TID 1004, observer type Device)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(manifest),
            name=lo(model_title(manifest)),
            manufacturer_name=MANUFACTURER,
            model_name=lo(manifest.name),
            serial_number=device_serial_number(manifest),
        ),
    )


def lo(text: str) -> str:
    """Fit a Long String (64 characters)."""
    return text if len(text) <= 64 else text[:61] + "..."


def copy_body_part(source: Dataset, ds: Dataset, *, laterality: bool = True) -> None:
    """Body Part Examined and Laterality of the source (General Series, PS3.3 C.7.3.1).

    Laterality is Type 2C (paired body parts): for GSPS and secondary capture, where the
    source names no body part it is left empty ("unknown") rather than absent. dciodvfy
    treats an empty Laterality in a SEG as present when the condition is unmet, so SEG
    copies the body part only (``laterality=False``).
    """
    body = str(source.get("BodyPartExamined", "") or "")
    if body:
        ds.BodyPartExamined = body
    if not laterality:
        return
    side = str(source.get("Laterality", "") or "")
    if side or not body:
        ds.Laterality = side


_REFERENCE_SEQUENCES = ("ReferencedStudySequence", "ReferencedPatientSequence",
                        "ReferencedPerformedProcedureStepSequence")


def drop_incomplete_references(ds: Dataset) -> None:
    """Drop items of copied patient/study references that lack their SOP class or instance.

    Some de-identified sources carry e.g. a Referenced Study Sequence item without its
    Referenced SOP Class UID (Type 1 in the SOP Instance Reference Macro, PS3.3 10.8);
    copied as is, the result would inherit the source's error.
    """
    for keyword in _REFERENCE_SEQUENCES:
        if keyword not in ds:
            continue
        items = [item for item in ds[keyword].value
                 if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")]
        if items:
            ds[keyword].value = items
        else:
            del ds[keyword]
