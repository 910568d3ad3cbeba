"""The measurements as a TID 1500 "Measurement Report" in a Comprehensive 3D SR.

``encode_sr(inp, seg)`` makes one Comprehensive 3D SR instance (PS3.3 A.35.13)
with highdicom, whose content is DCMR TID 1500 (PS3.16):

* observer context (TID 1002): the model as a **device** observer (TID 1004),
  UID/name/model/serial derived from the manifest's name and version
  (:func:`dicomnode.encode.equipment.device_observer`);
* procedure reported: (24627-2, LN, "CT Chest") for a CT model that accepts chest
  body parts, otherwise the modality's "... unspecified body region" from CID 100;
* one TID 1411 "Volumetric ROI Measurements" group per manifest label: tracking
  identifier = label name, tracking UID stable across revisions (the SEG segment's
  Tracking UID, :func:`dicomnode.encode.seg.tracking_uid`), finding type/category
  from the manifest, finding site = the label's anatomic region if any, TID 4019
  algorithm identification, a Referenced Segment (the SEG instance and segment
  number, with the source series as "Source series for segmentation"), and the
  label's measurements from ``inp.measurements[label.name]``;
* ``inp.measurements["total"]``, if present, as a TID 1501 group (no single
  segment covers it) with tracking identifier "total" and, as finding sites, the
  labels' anatomy; each of its measurements is "INFERRED FROM" (TID 300/320) the
  labels' outlines on the slice where they are largest together;
* per label with voxels, a TID 1410 "Planar ROI Measurements" group: its outline
  (SCOORD POLYLINE, TID 1410 "Image Region") on its representative slice (the one
  with most of its voxels, :mod:`dicomnode.encode.sr_regions`) and the area it
  encloses, with the same tracking identifier and UID as its TID 1411 group (the
  same finding, drawn where it is largest);
* an Image Library (TID 1600) entry for every image the outlines lie on; those
  images are in the evidence too.

Why the planar groups: OHIF 3 (extensions/cornerstone-dicom-sr, 3.13) merges a
report's groups by Tracking Unique Identifier and draws each merged finding from its
first SCOORD; a finding with no image coordinate at all stops its SR viewport
("Cannot read properties of undefined (reading 'ReferencedSOPSequence')"). With the
planar group every finding has an outline on a referenced image, and OHIF shows
the TID 1411 measurements (volume, densities) next to it. A label with no voxels and
no measurements gets no group at all (nothing to report; its SEG segment stays, empty)
unless no label has any (a report needs one group).
* same study, new series (``inp.uid("sr", ...)``, Series Number = source + 20000);
  the evidence (Current Requested Procedure Evidence Sequence) is the SEG;
* a later revision lists the SRs it replaces (``inp.replaces["sr"]``) in the
  Predecessor Documents Sequence (PS3.3 C.17.2.3).

Measurement concept names (CID 7469/7470 style where a standard code exists):

==================  ===============================================================
quantity            code
==================  ===============================================================
``volume``          (118565006, SCT, "Volume")
``mean density``    (112031, DCM, "Attenuation Coefficient") with derivation
                    (373098007, SCT, "Mean") — the TID 1419 post-coordinated form
``LAA%-950``        (LAA950, 99DICOMNODE, "Percent low attenuation area below -950 HU")
``PD15``            (PD15, 99DICOMNODE, "15th percentile of lung density")
anything else       (slug of the name, 99DICOMNODE, the name)
==================  ===============================================================

**Private codes.** LAA%-950 and PD15 have no code in DICOM PS3.16, SNOMED CT or
LOINC (as of pydicom 3.0's code dictionaries), so they use the private coding
scheme designator ``99DICOMNODE`` (PS3.16 8.2: designators starting "99" are
private), declared in the Coding Scheme Identification Sequence of every object
that uses it. Consumers that do not know the scheme still get the Code Meaning.

Units are UCUM as given (``ml``, ``%``, ``[hnsf'U]``...). A non-finite value (NaN,
infinity) cannot be encoded as a DS and is left out, with a warning.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.core.manifest import Label, Manifest
from dicomnode.encode import equipment as eq
from dicomnode.encode.base import EncodeInput, derived_uid
from dicomnode.encode.gsps import check_labels
from dicomnode.encode.seg import (
    PRIVATE_SCHEME,
    SEGMENTATION_STORAGE,
    coded,
    private_coding_scheme,
    quiet_person_name_warning,
    segment_number_of,
    tracking_uid,
)
from dicomnode.encode.sr_regions import (
    Outline,
    most_voxels,
    outline,
    slice_counts,
    total_from_counts,
)
from dicomnode.encode.validate import EncodingError

logger = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
AREA = codes.SCT.Area  # (42798000, SCT, "Area")
TOTAL = "total"
CHEST_BODY_PARTS = frozenset({"CHEST", "LUNG", "THORAX"})
CT_CHEST = Code("24627-2", "LN", "CT Chest")

#: quantity name -> (concept name, derivation or None)
QUANTITIES: dict[str, tuple[Code, Code | None]] = {
    "volume": (codes.SCT.Volume, None),
    "mean density": (codes.DCM.AttenuationCoefficient, codes.SCT.Mean),
    "LAA%-950": (Code("LAA950", PRIVATE_SCHEME, "Percent low attenuation area below -950 HU"), None),
    "PD15": (Code("PD15", PRIVATE_SCHEME, "15th percentile of lung density"), None),
}

#: UCUM code -> Code Meaning
UNIT_MEANINGS = {
    "ml": "milliliter", "mL": "milliliter", "l": "liter", "L": "liter",
    "mm": "millimeter", "cm": "centimeter", "mm2": "square millimeter",
    "mm3": "cubic millimeter", "cm3": "cubic centimeter", "%": "percent",
    "[hnsf'U]": "Hounsfield unit", "1": "no units", "g/ml": "gram per milliliter",
}

_PROCEDURE_BY_MODALITY = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}


def encode_sr(inp: EncodeInput, seg: Dataset) -> Dataset:
    """A TID 1500 Comprehensive 3D SR of ``inp.measurements`` on ``seg`` (see module docstring)."""
    manifest = inp.manifest
    _check(inp, seg)
    source = pydicom.dcmread(inp.source_paths[0], stop_before_pixels=True)
    source_series = hd.sr.SourceSeriesForSegmentation(inp.series_uid)
    drawn = Drawings.of(inp)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    algorithm = eq.sr_algorithm_id(manifest)
    for label in drawn.reported_labels(inp):
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(inp, label),
                                                         identifier=label.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=segment_number_of(manifest, label),
                source_series=source_series,
            ),
            finding_type=coded(label.type),
            finding_category=coded(label.category),
            finding_sites=[hd.sr.FindingSite(coded(label.anatomic_region))]
            if label.anatomic_region else None,
            algorithm_id=algorithm,
            measurements=measurements(inp.measurements.get(label.name, {}), label.name),
        ))
    if TOTAL in inp.measurements:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("dicomnode-tracking", inp.study_uid, inp.series_uid, manifest.name, TOTAL),
                identifier=TOTAL + " (" + " + ".join(lab.name for lab in manifest.labels) + ")"),
            finding_sites=[hd.sr.FindingSite(site) for site in _anatomy(manifest)] or None,
            algorithm_id=algorithm,
            measurements=measurements(inp.measurements[TOTAL], TOTAL, drawn.total_outlines()),
        ))
    groups.extend(drawn.planar_groups(inp, algorithm))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=eq.device_observer(manifest)),
        procedure_reported=procedure_reported(manifest, str(source.get("Modality", ""))),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=drawn.images() or None,
    )
    revision = f" rev {inp.revision}" if inp.revision > 1 else ""
    with quiet_person_name_warning():
        sr = _document(inp, seg, source, report, drawn.images())
    sr.SeriesDescription = eq.lo(f"{eq.model_title(manifest)} measurements{revision}")
    sr.ManufacturerModelName = eq.lo(manifest.name)
    # highdicom annotates str | tuple[str]; Software Versions is LO with VM 1-n
    sr.SoftwareVersions = eq.software_versions(manifest)  # type: ignore[assignment]
    sr.DeviceSerialNumber = eq.device_serial_number(manifest)
    if _uses_private_codes(sr):
        sr.CodingSchemeIdentificationSequence = [private_coding_scheme()]
    return sr


def _document(inp: EncodeInput, seg: Dataset, source: Dataset,
              report: hd.sr.MeasurementReport, images: list[Dataset]) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *images],
        content=report[0],
        series_instance_uid=inp.uid("sr", "series"),
        series_number=eq.series_number(source, "sr"),
        sop_instance_uid=inp.uid("sr", "instance"),
        instance_number=1,
        manufacturer=eq.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=_predecessors(inp) or None,
        contributing_equipment=[eq.contributing_equipment(inp.manifest, inp.device)],
    )


def measurements(values: dict[str, tuple[float, str]], where: str,
                 outlines: list[tuple[Outline, Dataset]] | None = None) -> list[hd.sr.Measurement]:
    """TID 1419 / TID 300 measurements of one group, in the model's order.

    ``outlines`` (TID 1501 groups only): the regions each measurement is inferred from
    (TID 300 "INFERRED FROM" TID 320 SCOORDs), given in a different order to each
    measurement (OHIF 3 draws the first SCOORD of each, so every outline is drawn).
    """
    out: list[hd.sr.Measurement] = []
    for quantity, (value, unit) in values.items():
        if not math.isfinite(float(value)):
            logger.warning("SR: %s %s is %r and is left out (DS cannot encode it)", where, quantity, value)
            continue
        name, derivation = concept(quantity)
        coords = None
        if outlines:
            n = len(out) % len(outlines)
            coords = [_coordinates(o, h) for o, h in outlines[n:] + outlines[:n]]
        out.append(hd.sr.Measurement(name=name, value=float(value), unit=ucum(unit), derivation=derivation,
                                     referenced_coordinates=coords))
    return out


def _coordinates(outline: Outline, image: Dataset) -> hd.sr.CoordinatesForMeasurement:
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline.points,
        source_image=_source_image(image))


def _source_image(image: Dataset) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(image.SOPClassUID),
                                      referenced_sop_instance_uid=str(image.SOPInstanceUID))


@dataclass(frozen=True, eq=False)
class Drawings:
    """The image geometry of one report (:mod:`dicomnode.encode.sr_regions`): per label
    with voxels its outline on its representative slice, the outlines on the slice of
    all labels together (for "total"), and the source headers of those slices."""

    by_label: dict[int, Outline]
    total: list[tuple[int, Outline]]  # (label value, outline) on the total's slice
    headers: dict[int, Dataset]  # slice index -> source header

    @classmethod
    def of(cls, inp: EncodeInput) -> Drawings:
        labels = check_labels(inp)
        values = [lab.value for lab in inp.manifest.labels]
        headers: dict[int, Dataset] = {}

        def header(k: int) -> Dataset:
            if k not in headers:
                headers[k] = pydicom.dcmread(inp.source_paths[k], stop_before_pixels=True)
            return headers[k]

        def spacing(k: int) -> tuple[float, float]:
            ps = header(k).get("PixelSpacing")
            if not ps or len(ps) != 2:
                raise EncodingError([f"source slice {k}: no PixelSpacing, outlines have no size"],
                                    what="SR input")
            return float(ps[0]), float(ps[1])

        by_label: dict[int, Outline] = {}
        counts = slice_counts(labels, values)  # one pass over the voxels for every label
        for value, per_slice in zip(values, counts, strict=True):
            k = most_voxels(per_slice)
            if k is not None:
                found = outline(labels[k] == value, k, spacing(k))
                if found is not None:
                    by_label[value] = found
        total: list[tuple[int, Outline]] = []
        k = total_from_counts(counts, avoid={o.slice_index for o in by_label.values()})
        if k is not None:
            for value in values:
                found = outline(labels[k] == value, k, spacing(k))
                if found is not None:
                    total.append((value, found))
        return cls(by_label, total, headers)

    def images(self) -> list[Dataset]:
        """The source headers the report draws on, in slice order (its Image Library)."""
        return [self.headers[k] for k in sorted(self.headers)]

    def reported_labels(self, inp: EncodeInput) -> list[Label]:
        """Labels that get a volumetric group: each one with voxels or measurements; every
        label when none has either (a report needs at least one group)."""
        out = [lab for lab in inp.manifest.labels
               if lab.value in self.by_label or inp.measurements.get(lab.name)]
        return out or list(inp.manifest.labels)

    def total_outlines(self) -> list[tuple[Outline, Dataset]]:
        return [(o, self.headers[o.slice_index]) for _, o in self.total]

    def planar_groups(self, inp: EncodeInput, algorithm: hd.sr.AlgorithmIdentification
                      ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
        """One TID 1410 group per label with voxels: its outline on its representative
        slice and the area it encloses; same tracking identifier and UID as the label's
        volumetric group (the same finding, drawn where it is largest)."""
        out = []
        for label in inp.manifest.labels:
            found = self.by_label.get(label.value)
            if found is None:
                continue
            out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(inp, label),
                                                             identifier=label.name),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=found.points,
                    source_image=_source_image(self.headers[found.slice_index])),
                finding_type=coded(label.type),
                finding_category=coded(label.category),
                finding_sites=[hd.sr.FindingSite(coded(label.anatomic_region))]
                if label.anatomic_region else None,
                algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(name=AREA, value=found.area_mm2, unit=ucum("mm2"))],
            ))
        return out


def concept(quantity: str) -> tuple[Code, Code | None]:
    """The concept name (and derivation) of a quantity; a private code for unknown names."""
    if quantity in QUANTITIES:
        return QUANTITIES[quantity]
    slug = re.sub(r"[^A-Z0-9]+", "", quantity.upper())[:16] or "QUANTITY"
    return Code(slug, PRIVATE_SCHEME, eq.lo(quantity)), None


def ucum(unit: str) -> Code:
    if not unit:
        raise EncodingError(["measurements: a unit is empty (UCUM '1' means no unit)"], what="SR input")
    return Code(unit, "UCUM", UNIT_MEANINGS.get(unit, unit))


def procedure_reported(manifest: Manifest, modality: str) -> Code:
    modality = modality.upper()
    if modality == "CT" and CHEST_BODY_PARTS & {b.upper() for b in manifest.accepts.body_parts}:
        return CT_CHEST
    return _PROCEDURE_BY_MODALITY.get(modality, codes.cid100.ImagingProcedure)


def _check(inp: EncodeInput, seg: Dataset) -> None:
    problems = []
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        problems.append(f"seg: not a Segmentation instance (SOP class {seg.get('SOPClassUID')})")
    elif str(seg.StudyInstanceUID) != inp.study_uid:
        problems.append("seg: belongs to another study than the input")
    elif len(seg.get("SegmentSequence", [])) != len(inp.manifest.labels):
        problems.append(f"seg: has {len(seg.get('SegmentSequence', []))} segments, the manifest "
                        f"{len(inp.manifest.labels)} labels")
    names = {lab.name for lab in inp.manifest.labels} | {TOTAL}
    unknown = sorted(set(inp.measurements) - names)
    if unknown:
        problems.append(f"measurements: {unknown} are neither labels of {inp.manifest.name} nor 'total'")
    if problems:
        raise EncodingError(problems, what="SR input")


def _anatomy(manifest: Manifest) -> list[hd.sr.CodedConcept]:
    """The anatomy the labels stand for: their type if an anatomical structure, else region."""
    out: list[hd.sr.CodedConcept] = []
    for label in manifest.labels:
        if label.category.value == "91723000" and label.category.scheme == "SCT":
            out.append(coded(label.type))
        elif label.anatomic_region is not None:
            out.append(coded(label.anatomic_region))
    return list({(c.value, c.scheme_designator): c for c in out}.values())


def _predecessors(inp: EncodeInput) -> list[Dataset]:
    """Datasets naming the SRs ``inp`` replaces, for the Predecessor Documents Sequence.

    ``inp.replaces["sr"]`` holds SOP Instance UIDs; their series is found among this
    model's earlier revisions (``EncodeInput.previous_uid``).
    """
    out = []
    for uid in inp.replaces.get("sr", ()):
        for rev in range(inp.revision - 1, 0, -1):
            if inp.previous_uid("sr", "instance", rev) == uid:
                series = inp.previous_uid("sr", "series", rev)
                break
        else:
            raise EncodingError([f"replaces['sr']: {uid} is not an SR of an earlier revision of "
                                 f"{eq.model_title(inp.manifest)} on this series; its series is unknown"],
                                what="SR input")
        ds = Dataset()
        ds.StudyInstanceUID = inp.study_uid
        ds.SeriesInstanceUID = series
        ds.SOPClassUID = COMPREHENSIVE_3D_SR
        ds.SOPInstanceUID = uid
        out.append(ds)
    return out


def _uses_private_codes(ds: Dataset) -> bool:
    found = False

    def visit(d: Dataset) -> None:
        nonlocal found
        if str(d.get("CodingSchemeDesignator", "")) == PRIVATE_SCHEME:
            found = True
        for elem in d:
            if elem.VR == "SQ" and not found:
                for item in elem.value:
                    visit(item)

    visit(ds)
    return found
