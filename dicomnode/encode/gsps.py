"""Viewer fallback 1: the label contours as a Grayscale Softcopy Presentation State.

For PACS viewers that cannot show DICOM-SEG but do apply presentation states
(PS3.3 A.33.1 Grayscale Softcopy Presentation State IOD), the prediction becomes,
per source slice and label, closed POLYLINE graphic objects that trace the label's
pixels (PS3.3 C.10.5 Graphic Annotation Module), one Graphic Layer per label in the
label's recommended display colour (C.10.7), and one text object per image and label
naming the label and the model.

Pixel coordinates (PS3.3 C.10.5.1.2, Graphic Annotation Units PIXEL): (column, row)
with the origin 0.0\\0.0 at the top left hand corner of the top left pixel, 1.0\\1.0 at
that pixel's bottom right hand corner, Columns\\Rows at the bottom right hand corner of
the bottom right pixel. So pixel (row i, column j), 0-based, is the square
[j, j+1] x [i, i+1], its centre (j + 0.5, i + 0.5). Contours here run along pixel
edges: their vertices are integer corners and a label's pixels lie exactly inside.

Model identity comes from :mod:`dicomnode.encode.equipment`; the helpers at the end
(window choice, body part, references) are shared with :mod:`dicomnode.encode.sc`.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom.dataset import Dataset

from dicomnode.core.manifest import Label, Manifest
from dicomnode.encode.base import EncodeInput, derived_uid
from dicomnode.encode.equipment import (
    MANUFACTURER,
    content_label,
    contributing_equipment,
    copy_body_part,
    device_serial_number,
    drop_incomplete_references,
    lo,
    model_title,
    series_number,
    software_versions,
)

logger = logging.getLogger(__name__)

# CT lung window (center, width) in HU
LUNG_WINDOW = (-600.0, 1500.0)
# Douglas-Peucker tolerance in pixels for the pixel-edge contours
SIMPLIFY_TOLERANCE = 0.5


# -- contours ---------------------------------------------------------------------------

# directions in (dx, dy) = (column, row) steps; turning right (clockwise on the screen,
# rows pointing down) maps (dx, dy) -> (-dy, dx)
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)


def trace_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of the pixels of a 2-D boolean ``mask``, along pixel edges.

    Each contour is an (N, 2) float array of (column, row) vertices in PS3.3 PIXEL
    units (integer corners, see the module docstring), first vertex repeated at the
    end. Outer boundaries run clockwise on the screen (positive shoelace area with rows
    pointing down), boundaries of holes counter-clockwise. Pixels touching only at a
    corner are separate regions (4-connectivity); only vertices where the boundary
    turns are kept.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask: expected a 2-D array, got shape {m.shape}")
    p = np.pad(m, 1)
    core = p[1:-1, 1:-1]
    # an edge per foreground pixel side that faces background, oriented so that the
    # foreground lies on its right: (start x, start y, dx, dy)
    sides = (
        (~p[:-2, 1:-1], 0, 0, _RIGHT),  # top side: (j, i) -> (j+1, i)
        (~p[1:-1, 2:], 1, 0, _DOWN),  # right side: (j+1, i) -> (j+1, i+1)
        (~p[2:, 1:-1], 1, 1, _LEFT),  # bottom side: (j+1, i+1) -> (j, i+1)
        (~p[1:-1, :-2], 0, 1, _UP),  # left side: (j, i+1) -> (j, i)
    )
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for open_side, ox, oy, d in sides:
        ii, jj = np.nonzero(core & open_side)
        for x, y in zip((jj + ox).tolist(), (ii + oy).tolist(), strict=True):
            outgoing[(x, y)].append(d)

    outgoing = dict(outgoing)
    unused = {(v, d) for v, ds in outgoing.items() for d in ds}
    contours = []
    for v0, ds in outgoing.items():
        for d0 in ds:
            if (v0, d0) not in unused:
                continue
            pts: list[tuple[int, int]] = []
            v, d = v0, d0
            while True:
                unused.discard((v, d))
                v = (v[0] + d[0], v[1] + d[1])
                options = outgoing[v]
                # of two edges leaving a vertex (pixels touching at a corner), the right
                # turn: it keeps to the pixel just passed (4-connectivity)
                nd = options[0] if len(options) == 1 else (-d[1], d[0])
                if nd != d:
                    pts.append(v)
                if (v, nd) == (v0, d0):
                    break
                d = nd
            # pts ends with v0 when the boundary turns there; rotate it to the front
            if pts[-1] == v0:
                pts = [pts[-1], *pts[:-1]]
            pts.append(pts[0])
            contours.append(np.asarray(pts, dtype=float))
    return contours


def contour_area(contour: np.ndarray) -> float:
    """Signed shoelace area in pixels (> 0 for outer boundaries of :func:`trace_contours`)."""
    x, y = contour[:, 0], contour[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2.0)


def simplify_closed(contour: np.ndarray, tolerance: float = SIMPLIFY_TOLERANCE) -> np.ndarray:
    """Douglas-Peucker on a closed polyline (first point repeated); keeps a subset of vertices."""
    pts = contour[:-1]
    n = len(pts)
    if n <= 4 or tolerance <= 0:
        return contour
    # split the ring at vertex 0 and the vertex farthest from it
    far = int(np.argmax(np.sum((pts - pts[0]) ** 2, axis=1)))
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, far, n]] = True
    ring = np.vstack([pts, pts[:1]])
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = ring[b] - ring[a]
        rel = ring[a + 1 : b] - ring[a]
        length = float(np.hypot(*seg))
        if length == 0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            mid = a + 1 + k
            keep[mid] = True
            stack += [(a, mid), (mid, b)]
    out = ring[keep]
    if len(out) < 4:  # keep at least a triangle
        return contour
    return out


def label_contours(mask: np.ndarray, tolerance: float = SIMPLIFY_TOLERANCE,
                   min_hole_pixels: int = 4) -> list[np.ndarray]:
    """The simplified closed contours of one label on one slice, largest first.

    Every outer boundary is kept (a single labelled pixel gets its square); holes
    smaller than ``min_hole_pixels`` pixels (speckle) are dropped.
    """
    out = []
    for c in trace_contours(mask):
        area = contour_area(c)
        if area < 0 and -area < min_hole_pixels:
            continue
        out.append((abs(area), simplify_closed(c, tolerance)))
    out.sort(key=lambda t: -t[0])
    return [c for _, c in out]


# -- the presentation state ------------------------------------------------------------


def encode_gsps(inp: EncodeInput, window: tuple[float, float] | None = None) -> list[Dataset]:
    """A Grayscale Softcopy Presentation State with the label contours (PS3.3 A.33.1).

    Same study as the source, a new series (UID ``inp.uid('gsps', 'series')``), one
    instance (``inp.uid('gsps', 'instance')``) referencing exactly the source images
    that carry a label. ``window`` (center, width) overrides the VOI LUT; by default the
    source images' own windows are copied, or the CT lung window for a lung model on CT
    when the source has none. Returns ``[]`` when no slice carries a label.

    Should the labelled images disagree on size or Rescale Slope/Intercept (one
    presentation state has one Modality LUT), one instance is made per group; the
    second and later ones get UIDs derived from the first.
    """
    labels = check_labels(inp)
    manifest = inp.manifest
    by_value = {lab.value: lab for lab in manifest.labels}
    present = [k for k in range(labels.shape[0]) if labels[k].any()]
    if not present:
        logger.info("gsps: no labelled slice, nothing to encode")
        return []

    headers = {k: _read_header(inp.source_paths[k]) for k in present}
    for k, h in headers.items():
        if (int(h.Rows), int(h.Columns)) != labels.shape[1:]:
            raise ValueError(
                f"labels: slice {k} is {labels.shape[1:]}, its source image "
                f"{inp.source_paths[k].name} is {(int(h.Rows), int(h.Columns))}")

    layers = {lab.value: _layer(lab, manifest) for lab in manifest.labels}
    title = model_title(manifest)

    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for k in present:
        h = headers[k]
        groups[(int(h.Rows), int(h.Columns), str(h.get("RescaleSlope", "")),
                str(h.get("RescaleIntercept", "")), str(h.get("RescaleType", "")),
                str(h.get("PhotometricInterpretation", "")))].append(k)

    first = headers[present[0]]
    series_uid = inp.uid("gsps", "series")
    base_instance = inp.uid("gsps", "instance")
    out: list[Dataset] = []
    for n, slices in enumerate(groups.values()):
        refs = [headers[k] for k in slices]
        annotations = []
        used_layers: set[int] = set()
        for k in slices:
            ref = headers[k]
            rows, cols = int(ref.Rows), int(ref.Columns)
            line = 0
            for value in sorted(int(v) for v in np.unique(labels[k]) if v != 0):
                lab = by_value[value]
                objects = [
                    GraphicObject(GraphicTypeValues.POLYLINE, c, AnnotationUnitsValues.PIXEL)
                    for c in label_contours(labels[k] == value)
                ]
                text = TextObject(
                    f"{lab.name} ({title})",
                    AnnotationUnitsValues.PIXEL,
                    bounding_box=_text_box(line, rows, cols),
                    text_justification="LEFT",
                )
                line += 1
                annotations.append(GraphicAnnotation(
                    referenced_images=[ref], graphic_layer=layers[value],
                    graphic_objects=objects, text_objects=[text]))
                used_layers.add(value)

        voi = None
        if window is not None:
            voi = [_voi(window, "requested window")]
        elif not any("WindowCenter" in r and "WindowWidth" in r for r in refs) \
                and is_lung_ct(manifest, str(first.get("Modality", ""))):
            voi = [_voi(LUNG_WINDOW, "lung window")]

        ps = GrayscaleSoftcopyPresentationState(
            referenced_images=refs,
            series_instance_uid=series_uid,
            series_number=series_number(first, "gsps"),
            sop_instance_uid=base_instance if n == 0 else derived_uid(base_instance, n),
            instance_number=n + 1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=lo(manifest.name),
            # highdicom annotates str | tuple[str] but takes any sequence of str (VM 1-n)
            software_versions=software_versions(manifest),  # type: ignore[arg-type]
            device_serial_number=device_serial_number(manifest),
            content_label=content_label(manifest),
            content_description=lo(f"{title} contours, not for diagnostic use"),
            graphic_annotations=annotations,
            graphic_layers=[layers[v] for v in sorted(used_layers)],
            voi_lut_transformations=voi,
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                # MONOCHROME1 sources: minimum value white, as the source intends (C.11.6)
                presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
                if refs[0].get("PhotometricInterpretation") == "MONOCHROME1"
                else hd.PresentationLUTShapeValues.IDENTITY),
            contributing_equipment=[contributing_equipment(manifest, inp.device)],
        )
        ps.SeriesDescription = lo(f"{title} contours (GSPS) NOT FOR DIAGNOSTIC USE")
        copy_body_part(first, ps)
        drop_incomplete_references(ps)
        out.append(ps)
    return out


def check_labels(inp: EncodeInput) -> np.ndarray:
    """``inp.labels`` as an array, checked against the sources and the manifest's labels."""
    labels = np.asarray(inp.labels)
    if labels.ndim != 3:
        raise ValueError(f"labels: expected (slices, rows, columns), got shape {labels.shape}")
    if labels.shape[0] != len(inp.source_paths):
        raise ValueError(f"labels: {labels.shape[0]} slices for {len(inp.source_paths)} "
                         "source_paths")
    unknown = inp.manifest.stray_label_values(labels)
    if unknown:
        raise ValueError(f"labels: values {unknown} are not labels of model "
                         f"{inp.manifest.name}")
    return labels


def _read_header(path: Path) -> Dataset:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"source_paths: {Path(path).name} is multi-frame; expected one "
                         "single-frame instance per slice")
    return ds


def _layer(lab: Label, manifest: Manifest) -> GraphicLayer:
    name = re.sub(r"[^A-Z0-9_]", "_", f"L{lab.value}_{lab.name.upper()}")[:16]
    layer = GraphicLayer(
        layer_name=name,
        order=lab.value,
        description=lo(f"{lab.name} ({model_title(manifest)})"),
        display_color=hd.color.CIELabColor.from_rgb(*lab.color),
    )
    # for grayscale-only displays: white
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    return layer


def _text_box(line: int, rows: int, cols: int) -> tuple[float, float, float, float]:
    """Bounding box (left, top, right, bottom) of text line ``line``, top left of the image."""
    height = max(1.0, rows / 20.0)
    top = 1.0 + line * height
    top = min(top, rows - height - 1.0)
    return (1.0, max(0.0, top), max(2.0, cols * 0.6), min(float(rows), top + height))


def _voi(window: tuple[float, float], explanation: str) -> SoftcopyVOILUTTransformation:
    center, width = (float(w) for w in window)
    if width < 1:
        raise ValueError(f"window: width must be >= 1, got {width}")
    voi = SoftcopyVOILUTTransformation(window_center=center, window_width=width)
    voi.WindowCenterWidthExplanation = [explanation]
    return voi


# -- shared with the secondary-capture encoder -------------------------------------------


def is_lung_ct(manifest: Manifest, modality: str) -> bool:
    """Whether the lung window suits: CT and a model about the lungs."""
    if modality.upper() != "CT":
        return False
    words = [manifest.name, *(lab.name for lab in manifest.labels),
             *(lab.type.meaning for lab in manifest.labels)]
    return any("lung" in w.lower() for w in words)
