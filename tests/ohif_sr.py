"""How OHIF 3.13 reads a TID 1500 SR, ported from its source for tests.

A port of ``extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts``
(``_getMeasurements``, ``_getMergedContentSequencesByTrackingUniqueIdentifiers``,
``_processTID1410Measurement``, ``_processNonGeometricallyDefinedMeasurement``,
``_checkIfCanAddMeasurementsToDisplaySet``), ``utils/isRehydratable.ts`` and
``tools/DICOMSRDisplayTool.ts`` as shipped in @ohif/app 3.13.2 (read in its dist
bundles), so that a test can say, without a browser, whether OHIF shows an SR's
measurements, which lines of text it draws, or where it would stop with a
TypeError. The browser test (test_browser_ohif.py) checks the same SR in OHIF itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGING_MEASUREMENTS = "126010"
MEASUREMENT_GROUP = "125007"
TRACKING_UID = "112040"
TRACKING_ID = "112039"
FINDING_SITE_SCT = "363698007"
IMAGE_LIBRARY = "111028"
TEXT_POSITION = ("TEXT_ANNOTATION_POSITION", "99CORNERSTONEJS")  # ignored SCOORDs
DRAWABLE = {"POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE"}  # DICOMSRDisplayTool
# @cornerstonejs/adapters: (graphic code, type, points) registered for hydration
ADAPTER_TYPES = {("DCM:111030", "POLYLINE", 4), ("DCM:111030", "POLYLINE", 5),
                 ("DCM:111030", "POINT", 1), ("DCM:111030", "POINT", 2)}
MAX_TEXT_LINES = 5  # DICOMSRDisplayTool._getTextBoxLinesFromLabels


class OhifStops(AssertionError):
    """Where OHIF 3.13 would throw (the SR viewport shows "Something went wrong")."""


@dataclass
class Coord:
    value_type: str
    graphic_type: str
    points: int
    referenced_sop: str | None
    referenced_frame: int


@dataclass
class OhifMeasurement:
    tracking_uid: str
    tracking_identifier: str
    geometric: bool  # read through the TID 1410 path
    coords: list[Coord] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    graphic_code: str = ""

    def text_lines(self) -> list[str]:
        """The lines DICOMSRDisplayTool writes next to the outline."""
        return [f"{label}: {value}" for label, value in self.labels[:MAX_TEXT_LINES]]


def _code(item: Any) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _label(num: Any) -> tuple[str, str]:
    value = num.MeasuredValueSequence[0]
    unit = value.MeasurementUnitsCodeSequence[0].CodeValue  # a TypeError in OHIF if absent
    number = float(value.NumericValue)
    text = f"{number:.2f}" if number else ""  # JS: NumericValue ? Number(..).toFixed(2) : ''
    return str(num.ConceptNameCodeSequence[0].CodeMeaning), f"{text} {unit}"


def _coord(item: Any) -> Coord:
    ref = None
    frame = 1
    for child in item.get("ContentSequence", [])[:1]:  # dcmjs: ContentSequence[0]
        if "ReferencedSOPSequence" in child:
            sop = child.ReferencedSOPSequence[0]
            ref = str(sop.ReferencedSOPInstanceUID)
            frame = int(sop.get("ReferencedFrameNumber", 1) or 1)
    width = 3 if item.ValueType == "SCOORD3D" else 2
    return Coord(str(item.ValueType), str(item.GraphicType), len(item.GraphicData) // width,
                 ref, frame)


def _is_text_position(item: Any) -> bool:
    seq = item.get("ConceptNameCodeSequence")
    return bool(seq) and (seq[0].CodeValue, seq[0].CodingSchemeDesignator) == TEXT_POSITION


def measurements(sr: Any) -> list[OhifMeasurement]:
    """OHIF's measurements of ``sr`` (a pydicom dataset), in OHIF's order."""
    root = list(sr.get("ContentSequence", []))
    container = next((i for i in root if _code(i) == IMAGING_MEASUREMENTS), None)
    if container is None:
        return []
    groups = [g for g in container.get("ContentSequence", []) if _code(g) == MEASUREMENT_GROUP]
    merged: dict[str, list[Any]] = {}
    for group in groups:
        items = list(group.get("ContentSequence", []))
        uid_item = next((i for i in items if _code(i) == TRACKING_UID), None)
        if uid_item is None:
            raise OhifStops("a measurement group without Tracking Unique Identifier "
                            "(TypeError reading .UID of undefined)")
        key = str(uid_item.UID)
        if key not in merged:
            merged[key] = items
        else:
            merged[key] += [i for i in items if _code(i) != TRACKING_UID]
    out = []
    for key, items in merged.items():
        tracking = next((i for i in items if _code(i) == TRACKING_ID), None)
        uidref = next((i for i in items if i.ValueType == "UIDREF"), None)
        if tracking is None or uidref is None:
            raise OhifStops(f"finding {key}: no Tracking Identifier / UIDREF item")
        nums = [i for i in items if i.ValueType == "NUM"]
        if any(i.ValueType in ("SCOORD", "SCOORD3D") and not _is_text_position(i)
               for i in items):
            graphic = next(i for i in items if i.ValueType in ("SCOORD", "SCOORD3D"))
            name = graphic.ConceptNameCodeSequence[0]
            m = OhifMeasurement(str(uidref.UID), str(tracking.TextValue), True,
                                [_coord(graphic)],
                                graphic_code=f"{name.CodingSchemeDesignator}:{name.CodeValue}")
            m.labels = [_label(n) for n in nums if "MeasuredValueSequence" in n]
            sites = [i for i in items if _code(i) == FINDING_SITE_SCT
                     and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SCT"]
            if sites:
                m.labels.append((FINDING_SITE_SCT, str(sites[0].ConceptCodeSequence[0].CodeMeaning)))
        else:
            m = OhifMeasurement(str(uidref.UID), str(tracking.TextValue), False)
            for n in nums:
                children = list(n.get("ContentSequence", []))
                if children:
                    scoords = [c for c in children if c.ValueType in ("SCOORD", "SCOORD3D")]
                    plain = [c for c in scoords if "ConceptNameCodeSequence" not in c]
                    if not scoords:
                        continue  # "contains no SCOORD or SCOORD3D entry, skipping"
                    m.coords.append(_coord((plain or scoords)[0]))
                if "MeasuredValueSequence" in n:
                    m.labels.append(_label(n))
        out.append(m)
    return out


def shown_on(sr: Any, image_uids: set[str]) -> list[OhifMeasurement]:
    """The measurements OHIF draws once a series with ``image_uids`` is displayed;
    raises :class:`OhifStops` where OHIF would throw instead."""
    shown = []
    for m in measurements(sr):
        if not m.coords:
            raise OhifStops(f"{m.tracking_identifier!r}: no image coordinate (TypeError: "
                            "Cannot read properties of undefined (reading 'ReferencedSOPSequence'))")
        first = m.coords[0]
        if first.value_type == "SCOORD3D" or first.referenced_sop is None:
            continue
        if any(c.referenced_sop is None for c in m.coords):
            raise OhifStops(f"{m.tracking_identifier!r}: a coordinate without image reference")
        if first.referenced_sop not in image_uids:
            continue
        for c in m.coords:
            if c.graphic_type not in DRAWABLE:
                raise OhifStops(f"{m.tracking_identifier!r}: Unsupported GraphicType {c.graphic_type}")
            if c.referenced_sop != first.referenced_sop:
                raise AssertionError(f"{m.tracking_identifier!r}: drawn on the image of its first "
                                     "coordinate, but another lies on a different image")
        shown.append(m)
    return shown


def rehydratable(sr: Any) -> list[OhifMeasurement]:
    """Measurements OHIF would offer to convert into editable tools (a hydration adapter
    matches their graphic code, type and point count)."""
    out = []
    for m in measurements(sr):
        if m.geometric and m.coords:
            c = m.coords[0]
            if (m.graphic_code, c.graphic_type, c.points) in ADAPTER_TYPES or \
                    m.tracking_identifier.startswith(("Cornerstone3DTools@", "cornerstoneTools@")):
                out.append(m)
    return out


def image_library(sr: Any) -> list[str]:
    """SOP Instance UIDs listed in the report's Image Library (TID 1600)."""
    out = []
    for item in sr.get("ContentSequence", []):
        if _code(item) != IMAGE_LIBRARY:
            continue
        for group in item.get("ContentSequence", []):
            for entry in group.get("ContentSequence", []):
                if "ReferencedSOPSequence" in entry:
                    out.append(str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return out
