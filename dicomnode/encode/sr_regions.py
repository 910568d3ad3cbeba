"""Where an SR's measurements are drawn: one representative slice per structure.

A TID 1500 report whose measurement groups only reference a SEG segment (TID 1411) has
no image geometry, and OHIF 3 (extensions/cornerstone-dicom-sr, up to 3.13 at least)
cannot show such a group: every measurement it reads needs a spatial coordinate
(SCOORD/SCOORD3D) referencing an image, and a group without one stops its SR viewport
("Cannot read properties of undefined (reading 'ReferencedSOPSequence')").
:mod:`dicomnode.encode.sr` therefore adds, per structure with voxels, a TID 1410
planar group on that structure's **representative slice**, computed here:

* the slice with the most voxels of the label (ties: the one nearest the middle of
  the labelled slices, then the lower index), so that the picture is where the
  structure is largest;
* on it, the outline of the label's largest connected region (4-connectivity), traced
  along pixel edges and simplified by :func:`dicomnode.encode.gsps.label_contours`
  (the same contours the GSPS fallback draws), as a closed POLYLINE in SCOORD image
  coordinates (PS3.3 C.18.6.1.2: column\\row, 0.0\\0.0 the top left corner of the top
  left pixel), first point repeated at the end;
* the area the outline encloses (shoelace, mm² from PixelSpacing).

A closed outline gets at least 6 points (edge midpoints are added to a 4- or
5-point one): OHIF's SR adapters take a 4/5-point "Image Region" polyline for a
rectangle tool, which these outlines are not.

The "total" group is drawn on the slice that carries most of all labels together
(:func:`total_slice`), among the slices that show every label and, where possible,
not on a single label's own slice (OHIF places every text box beside its outline, so
two findings outlined on one slice would write their numbers over each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicomnode.encode.gsps import contour_area, label_contours

#: fewest points of an outline (closing point included); see the module docstring
MIN_POINTS = 6


@dataclass(frozen=True, eq=False)
class Outline:
    """One closed outline on one source slice (``inp.source_paths[slice_index]``)."""

    slice_index: int
    points: np.ndarray  # (N, 2) float column, row (SCOORD PIXEL units); points[0] == points[-1]
    area_mm2: float


def slice_counts(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Voxels of each of ``values`` on each slice (axis 0) of ``labels``: shape
    (len(values), slices). One pass finds the slices with any label; only those are
    counted: value by value (a compare and a popcount, ~15x faster than a histogram,
    which widens every voxel to 64 bits) for a few values, a histogram for many."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    counts = np.zeros((len(values), n), dtype=np.int64)
    if not values or flat.shape[1] == 0:
        return counts
    for k in np.flatnonzero(flat.any(axis=1)):
        row = flat[k]
        if row.dtype == np.uint8 and len(values) > 16:
            counts[:, k] = np.bincount(row, minlength=256)[values]
        else:
            counts[:, k] = [np.count_nonzero(row == v) for v in values]
    return counts


def representative_slice(mask: np.ndarray) -> int | None:
    """The slice (axis 0) of ``mask`` with the most voxels (see module docstring), or None."""
    return most_voxels(slice_counts(np.asarray(mask, dtype=bool).view(np.uint8), [1])[0])


def most_voxels(counts: np.ndarray) -> int | None:
    """The representative slice given the voxels per slice: the most, ties to the one
    nearest the middle of the slices with any, then the lower index; None if none."""
    if not counts.any():
        return None
    best = np.flatnonzero(counts == counts.max())
    present = np.flatnonzero(counts)
    middle = (present[0] + present[-1]) / 2.0
    return int(best[np.argmin(np.abs(best - middle))])


def outline(mask2d: np.ndarray, slice_index: int,
            pixel_spacing: tuple[float, float]) -> Outline | None:
    """The outline of the largest region of a 2-D ``mask2d`` (None when it is empty).

    ``pixel_spacing``: (between rows, between columns) in mm, as in PixelSpacing.
    """
    contours = [c for c in label_contours(np.asarray(mask2d, dtype=bool))
                if contour_area(c) > 0]  # outer boundaries only (holes run the other way)
    if not contours:
        return None
    best = max(contours, key=contour_area)  # label_contours sorts by |area|, holes included
    points = densify(best)
    area = abs(contour_area(points)) * float(pixel_spacing[0]) * float(pixel_spacing[1])
    return Outline(slice_index, points, area)


def densify(points: np.ndarray, minimum: int = MIN_POINTS) -> np.ndarray:
    """A closed polyline with at least ``minimum`` points: edge midpoints are inserted
    (the shape is unchanged)."""
    pts = np.asarray(points, dtype=float)
    while len(pts) < minimum:
        mids = (pts[:-1] + pts[1:]) / 2.0
        out = np.empty((2 * len(pts) - 1, 2))
        out[0::2] = pts
        out[1::2] = mids
        pts = out
    return pts


def total_slice(labels: np.ndarray, values: list[int], avoid: set[int] | None = None
                ) -> int | None:
    """The representative slice of all ``values`` together: the one with most of them
    among the slices that show every value present, leaving out the slices in ``avoid``
    (the single structures' own slices, so that a viewer does not write two text boxes
    at the same place) unless no other slice shows them all."""
    return total_from_counts(slice_counts(labels, values), avoid)


def total_from_counts(counts: np.ndarray, avoid: set[int] | None = None) -> int | None:
    """:func:`total_slice` given :func:`slice_counts` of the values."""
    counts = counts[counts.any(axis=1)]  # the values present
    if len(counts) == 0:
        return None
    every = np.flatnonzero(counts.min(axis=0) > 0)
    if len(every) == 0:  # no slice shows them all: the slice with most of them
        return most_voxels(counts.sum(axis=0))
    preferred = [k for k in every if k not in (avoid or set())]
    pool = np.array(preferred or every)
    totals = counts.sum(axis=0)[pool]
    best = pool[totals == totals.max()]
    middle = (every[0] + every[-1]) / 2.0
    return int(best[np.argmin(np.abs(best - middle))])


__all__ = ["MIN_POINTS", "Outline", "densify", "most_voxels", "outline", "representative_slice",
           "slice_counts", "total_from_counts", "total_slice"]
