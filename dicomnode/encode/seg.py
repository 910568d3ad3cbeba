"""The prediction as a DICOM Segmentation (PS3.3 A.51, Segmentation IOD; C.8.20).

``encode_seg(inp)`` makes one BINARY Segmentation instance with highdicom:

* one segment per manifest label, in manifest order (segment numbers 1..N;
  label values need not be 1..N), each with its category and type (CID 7150/7151
  style SNOMED codes from the manifest), anatomic region if the manifest gives one,
  the recommended display colour, algorithm type AUTOMATIC and the model's
  Algorithm Identification; Tracking ID/UID are the label's name and a UID stable
  across revisions (:func:`tracking_uid`), the same as the SR measurement group's;
* same study, new series: Series/SOP Instance UIDs are ``inp.uid("seg", ...)``,
  Series Number = source Series Number + 10000, description naming the model;
* frames in the source geometry: the source instances are passed to highdicom in
  the volume's slice order (``labels[k]`` lies on ``source_paths[k]``), so each
  frame's Derivation Image Sequence / Source Image Sequence names the source
  instance it lies on and its Plane Position (Patient) is that instance's
  ImagePositionPatient; the Referenced Series Sequence (Common Instance
  Reference Module, C.12.2) names the source series and instances;
* frames are ordered segment by segment, then by position (highdicom sorts the
  planes along its own slice normal, so frame order may run opposite to the volume's
  ``k``: consumers must, and viewers do, use each frame's source reference and
  position, never its index); the Dimension Index is (Referenced Segment Number,
  Image Position Patient). Dimension Organization Type "3D" is not set: with more
  than one segment, frames differ by segment as well as position (PS3.3 C.7.6.17.1);
* **empty frames are kept** (``omit_empty_frames=False``): every segment has one
  frame per source instance. Viewers have mis-drawn SEGs whose frames skip slices,
  and a full stack makes the frame <-> source mapping trivial. The cost is size:
  a BINARY frame is Rows*Columns/8 bytes (32 KiB at 512x512), so 300 slices x 2
  segments are 19.7 MB and 5 segments 49 MB, whatever the labels cover (bench/encode.py). BINARY SEG has no
  compressed transfer syntax in highdicom that viewers read widely, so it is Explicit
  VR Little Endian;
* Contributing Equipment naming the model (IHE AIR), see
  :mod:`dicomnode.encode.equipment`;
* a later revision (``inp.replaces["seg"]``) names the SEG(s) it replaces in the
  General Reference Module (C.12.4) Referenced Instance Sequence, with Purpose of
  Reference (REPLACED, 99DICOMNODE, "Replaces earlier revision") — the Segmentation
  IOD has no Predecessor Documents Sequence — and says so in Content Description.

Source headers are read with ``stop_before_pixels``: highdicom needs only their
attributes, never their pixels. For a series of single-frame slices, highdicom builds
the SEG of the first two slices and :mod:`dicomnode.encode.seg_frames` expands it to
the whole series (the same content, element for element, five times faster); anything
else is encoded by highdicom whole.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.core.manifest import Code as ManifestCode
from dicomnode.core.manifest import Label, Manifest
from dicomnode.encode import equipment as eq
from dicomnode.encode import seg_frames
from dicomnode.encode.base import EncodeInput, derived_uid
from dicomnode.encode.validate import EncodingError

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Private coding scheme of dicomnode (documented in :mod:`dicomnode.encode.sr`).
PRIVATE_SCHEME = "99DICOMNODE"
REPLACES = Code("REPLACED", PRIVATE_SCHEME, "Replaces earlier revision")


def private_coding_scheme() -> Dataset:
    """Coding Scheme Identification Sequence item (PS3.3 C.12.1.1.4) of ``99DICOMNODE``."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicomnode local codes"
    item.CodingSchemeResponsibleOrganization = "dicomnode"
    return item


@dataclass(eq=False)
class SegPlan:
    """A SEG made before its labels exist (:func:`plan_seg`): every attribute but the
    Pixel Data, which :func:`encode_seg` adds. Used once."""

    key: tuple[object, ...]
    seg: Dataset
    order: np.ndarray  # the frame order of the source planes
    shape: tuple[int, int, int]  # (source instances, rows, columns)
    used: bool = False


def _plan_key(inp: EncodeInput) -> tuple[object, ...]:
    """What a SEG depends on, apart from the labels."""
    m = inp.manifest
    return (tuple(str(p) for p in inp.source_paths), m.model_dump_json(), inp.study_uid,
            inp.series_uid, inp.revision, inp.device,
            tuple(sorted((k, tuple(v)) for k, v in inp.replaces.items())))


def plan_seg(inp: EncodeInput) -> SegPlan | None:
    """The SEG of ``inp`` without its Pixel Data (``inp.labels`` are not used), made while
    the model runs; None where the series needs highdicom whole (see
    :mod:`dicomnode.encode.seg_frames`)."""
    if not inp.source_paths:
        return None
    refs = seg_frames.read_refs(inp.source_paths)
    why = seg_frames.eligible(refs) if refs is not None else "a source header needs pydicom"
    if refs is None or why:
        logger.debug("SEG encoded by highdicom whole: %s", why)
        return None
    revision = f" rev {inp.revision}" if inp.revision > 1 else ""
    shape = (len(refs), refs[0].rows, refs[0].columns)
    sources = read_sources(inp.source_paths[:2])
    placeholder = np.zeros((2, shape[1], shape[2]), dtype=np.uint8)  # every frame is kept
    try:
        with quiet_person_name_warning():
            small = _segmentation(inp, sources, placeholder, revision)
        seg, order = seg_frames.expand(small, refs, len(inp.manifest.labels),
                                       source_spacing="SpacingBetweenSlices" in sources[0])
    except (ValueError, KeyError, AttributeError, IndexError) as exc:
        logger.warning("SEG frames not expanded (%s); highdicom encodes the whole series", exc)
        return None
    _series_attributes(seg, inp, sources[0], revision)
    return SegPlan(_plan_key(inp), seg, order, shape)


def encode_seg(inp: EncodeInput, plan: SegPlan | None = None) -> Dataset:
    """A BINARY DICOM-SEG of ``inp.labels`` on the source series (see the module
    docstring). ``plan``: :func:`plan_seg` of the same input, made earlier (while the
    model ran); only the Pixel Data is then left to do."""
    manifest = inp.manifest
    if not inp.source_paths:
        raise EncodingError(["source_paths: no source instances"], what="SEG input")
    if plan is not None and (plan.used or plan.key != _plan_key(inp)):
        logger.warning("SEG plan does not fit this input; encoded afresh")
        plan = None
    if plan is None:
        plan = plan_seg(inp)
    if plan is not None:
        labels = segment_array(inp.labels, manifest, plan.shape)
        plan.used = True
        seg_frames.fill_pixels(plan.seg, plan.order, labels, len(manifest.labels))
        return plan.seg
    revision = f" rev {inp.revision}" if inp.revision > 1 else ""
    sources = read_sources(inp.source_paths)
    labels = segment_array(inp.labels, manifest, (len(sources), int(sources[0].Rows),
                                                  int(sources[0].Columns)))
    with quiet_person_name_warning():
        seg = _segmentation(inp, sources, labels, revision)
    _series_attributes(seg, inp, sources[0], revision)
    return seg


def _series_attributes(seg: Dataset, inp: EncodeInput, first: Dataset, revision: str) -> None:
    """Series description, body part, copied references cleaned, what it replaces."""
    manifest = inp.manifest
    seg.SeriesDescription = eq.lo(f"{eq.model_title(manifest)} SEG{revision}")
    eq.copy_body_part(first, seg, laterality=False)
    eq.drop_incomplete_references(seg)
    replaced = inp.replaces.get("seg", ())
    if replaced:
        seg.ReferencedInstanceSequence = [_replaced_item(uid) for uid in replaced]
        seg.CodingSchemeIdentificationSequence = [private_coding_scheme()]
        seg.ContentDescription = eq.lo(f"{eq.model_title(manifest)} segmentation, revision "
                                       f"{inp.revision}, replaces {len(replaced)} earlier")


@contextlib.contextmanager
def quiet_person_name_warning() -> Iterator[None]:
    """highdicom warns about single-component Patient's Names copied from the source,
    quoting the name: a patient identifier, which must not reach the logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name")
        yield


def _segmentation(inp: EncodeInput, sources: list[Dataset], labels: np.ndarray,
                  revision: str) -> hd.seg.Segmentation:
    manifest = inp.manifest
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(inp),
        series_instance_uid=inp.uid("seg", "series"),
        series_number=eq.series_number(sources[0], "seg"),
        sop_instance_uid=inp.uid("seg", "instance"),
        instance_number=1,
        manufacturer=eq.MANUFACTURER,
        manufacturer_model_name=eq.lo(manifest.name),
        software_versions=eq.software_versions(manifest),  # type: ignore[arg-type]
        device_serial_number=eq.device_serial_number(manifest),
        content_label=eq.content_label(manifest),
        content_description=eq.lo(f"{eq.model_title(manifest)}{revision} segmentation"),
        content_creator_name=None,
        omit_empty_frames=False,
        contributing_equipment=[eq.contributing_equipment(manifest, inp.device)],
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )


def read_sources(paths: Sequence[Path]) -> list[Dataset]:
    """The source headers, in the given (volume) order, without pixel data."""
    if not paths:
        raise EncodingError(["source_paths: no source instances"], what="SEG input")
    out: list[Dataset] = []
    for p in paths:
        try:
            out.append(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
            raise EncodingError([f"source_paths: cannot read {Path(p).name}: {exc}"],
                                what="SEG input") from exc
    return out


def segment_array(labels: np.ndarray, manifest: Manifest,
                  source_shape: tuple[int, int, int]) -> np.ndarray:
    """``labels`` as a uint8 label map of segment numbers 1..N (manifest order), checked
    against ``source_shape`` (source instances, rows, columns)."""
    problems = []
    n_sources, rows, cols = source_shape
    if labels.ndim != 3:
        problems.append(f"labels: must be 3-D (slices, rows, columns), got shape {labels.shape}")
    elif labels.shape[0] != n_sources:
        problems.append(f"labels: {labels.shape[0]} slices for {n_sources} source instances")
    else:
        if labels.shape[1:] != (rows, cols):
            problems.append(f"labels: slices of {labels.shape[1:]} but the source is {rows}x{cols}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        problems.append(f"labels: must be integer label values, got dtype {labels.dtype}")
    if problems:
        raise EncodingError(problems, what="SEG input")
    values = [lab.value for lab in manifest.labels]
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if labels.size and int(labels.min()) < 0:
        raise EncodingError(["labels: negative label values"], what="SEG input")
    top = int(labels.max(initial=0))
    if values == list(range(1, len(values) + 1)):
        # the usual case: label value = segment number, no remapping
        if top > len(values):
            unknown = sorted(set(np.unique(labels[labels > len(values)]).tolist()))
            raise _unknown(unknown, manifest)
        return np.ascontiguousarray(labels, dtype=np.uint8)
    lut = np.zeros(max(top, *values) + 1, dtype=np.uint8)
    known = np.zeros(lut.shape, dtype=bool)
    known[0] = True
    for number, value in enumerate(values, start=1):
        lut[value] = number
        known[value] = True
    if not known[labels].all():
        raise _unknown(sorted(set(np.unique(labels[~known[labels]]).tolist())), manifest)
    return lut[labels]


def _unknown(unknown: list[int], manifest: Manifest) -> EncodingError:
    values = [lab.value for lab in manifest.labels]
    return EncodingError([f"labels: values {unknown} are not labels of {manifest.name} "
                          f"(manifest has {values})"], what="SEG input")


def tracking_uid(inp: EncodeInput, label: Label) -> str:
    """Tracking UID of a label's finding: the same across revisions and model versions,
    so that a revised SEG/SR is recognisably about the same structure."""
    return derived_uid("dicomnode-tracking", inp.study_uid, inp.series_uid, inp.manifest.name,
                       label.value)


def segment_descriptions(inp: EncodeInput) -> list[hd.seg.SegmentDescription]:
    algorithm = eq.algorithm_identification(inp.manifest)
    out = []
    for number, label in enumerate(inp.manifest.labels, start=1):
        r, g, b = label.color
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=eq.lo(label.name),
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(inp, label),
            tracking_id=eq.lo(label.name),
            anatomic_regions=[coded(label.anatomic_region)] if label.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(r, g, b),
        ))
    return out


def coded(code: ManifestCode) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_number_of(manifest: Manifest, label: Label) -> int:
    """The SEG segment number of ``label`` (its 1-based place in the manifest)."""
    return [lab.value for lab in manifest.labels].index(label.value) + 1


def _replaced_item(sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = SEGMENTATION_STORAGE
    item.ReferencedSOPInstanceUID = sop_instance_uid
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(REPLACES)]
    return item
