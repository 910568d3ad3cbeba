"""Series to Volume: read a classic single-frame image series into one 3-D array.

``load_series(paths)`` returns a :class:`~dicomnode.inference.geometry.Volume`
(conventions in that module's docstring) or refuses with
:class:`~dicomnode.errors.InconsistentSeriesError` listing every reason.

Geometry (PS3.3 C.7.6.2, Image Plane Module):

* one SeriesInstanceUID, one FrameOfReferenceUID, one ImageOrientationPatient,
  one Rows/Columns and one PixelSpacing across the files;
* slices are sorted along the normal ``cross(IOP[0:3], IOP[3:6])`` by the
  projection of ImagePositionPatient; the slice spacing comes from those positions,
  never from SliceThickness (which is the reconstructed thickness, not the step);
* refused: missing positions, duplicated positions (multi-echo / multi-phase mixed
  into one series), a missing slice (an isolated gap larger than
  ``GAP_FACTOR`` x the median step), uneven steps (``uneven='keep'`` keeps them:
  ``slice_positions`` are then authoritative), and gantry tilt (positions that
  drift in-plane along the stack; ``tilt='keep'`` keeps the slices as acquired and
  records the angle in ``metadata['gantry_tilt_deg']``).

Values (PS3.3 C.11.1.1.2, Modality LUT): ``stored * RescaleSlope + RescaleIntercept``
per slice, as float32 (computed exactly in float64 when slope or intercept is not an
integer). MONOCHROME1 is *not* inverted: Rescale Slope/Intercept give the modality
values whatever the Photometric Interpretation, which only says how to display them
(PS3.3 C.7.6.3.1.2); ``metadata['photometric_interpretation']`` records it, and a
series mixing MONOCHROME1 and MONOCHROME2 is refused.

Decoding (:mod:`dicomnode.inference.slices`): native (uncompressed) little- and
big-endian pixel data are read with ``np.frombuffer`` straight from the file's bytes
at the Pixel Data offset found by the one element walker (:mod:`dicomnode.core.elements`,
PS3.5 7.1, 7.5) that visits only the top-level data set and skips sequences;
encapsulated pixel data (JPEG, JPEG-LS, JPEG 2000, RLE, ...) go
through pydicom's ``pixel_array`` with the permissively licensed decoder plugins that
:mod:`dicomnode.core.decoders` lists (GDCM, openjpeg, RLE, libjpeg-turbo for 12-bit
JPEG). Any file the walker is unsure of (no preamble, deflate, float pixel data, odd bit depths, a
length that does not add up) is handed to pydicom whole. Headers and native slices
are read in the calling thread (from the page cache this beats threads contending for
the GIL); compressed slices are decoded in a thread pool; every slice is written into
one preallocated float32 array.

Multi-frame instances (Enhanced CT/MR, NumberOfFrames > 1) are refused for now:
their geometry lives in per-frame functional groups.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dicomnode.core import decoders
from dicomnode.errors import InconsistentSeriesError
from dicomnode.inference.geometry import Volume
from dicomnode.inference.slices import Slice, read_slice, rescale_into, stored_values

logger = logging.getLogger(__name__)

#: A step larger than this many median steps, between regular neighbours, is a missing slice.
GAP_FACTOR = 1.5
#: Steps may differ from the median step by this fraction plus ``SPACING_ATOL_MM``.
SPACING_RTOL = 0.02
SPACING_ATOL_MM = 0.01
#: Two slices closer than this along the normal share one position.
DUPLICATE_TOL_MM = 0.01
#: In-plane drift of the positions over the series, in pixels, beyond which it is tilted.
TILT_TOL_PIXELS = 0.1
#: Direction cosines equal within this (about 0.06 degree).
ORIENTATION_ATOL = 1e-3
#: Pixel spacings equal within this relative tolerance.
PIXEL_SPACING_RTOL = 1e-3

# --------------------------------------------------------------------------- geometry


def _check_same(items: list[Slice], keyword: str, what: str, reasons: list[str]) -> None:
    counts = Counter(str(item.get(keyword, "(absent)")) for item in items)
    if len(counts) > 1:
        detail = ", ".join(f"{n} file(s)" for _, n in counts.most_common())
        reasons.append(f"mixed {what}: {len(counts)} different values ({detail})")


def _vector(item: Slice, keyword: str, size: int) -> np.ndarray | None:
    value = item.get(keyword)
    if not isinstance(value, list) or len(value) != size:
        return None
    arr = np.asarray(value, dtype=float)
    return arr if np.all(np.isfinite(arr)) else None


def _pairwise_steps(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions) if positions.size > 1 else np.zeros(0)


def _spacing_reasons(
    positions: np.ndarray, names: list[str], uneven: str
) -> tuple[list[str], bool]:
    """Reasons to refuse the slice steps, and whether they are uneven (kept)."""
    steps = _pairwise_steps(positions)
    if steps.size == 0:
        return [], False
    reasons: list[str] = []
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        pairs = ", ".join(f"{names[k]} and {names[k + 1]}" for k in dup[:3])
        more = f" and {dup.size - 3} more" if dup.size > 3 else ""
        reasons.append(
            f"duplicated slice positions: {dup.size} pair(s) share a position along the "
            f"normal ({pairs}{more}); several echoes, phases or acquisitions in one series?"
        )
        return reasons, False
    median = float(np.median(steps))
    tol = SPACING_RTOL * median + SPACING_ATOL_MM
    regular = np.abs(steps - median) <= tol
    missing: list[int] = []
    for gap in np.flatnonzero(steps > GAP_FACTOR * median):
        left_ok = gap == 0 or regular[gap - 1]
        right_ok = gap == steps.size - 1 or regular[gap + 1]
        if left_ok and right_ok and steps.size > 2:
            missing.append(int(gap))
    for k in missing[:3]:
        reasons.append(
            f"missing slice: gap of {steps[k]:.2f} mm ({steps[k] / median:.1f} x the median "
            f"step {median:.2f} mm) between {names[k]} (at {positions[k]:.2f} mm) and "
            f"{names[k + 1]} (at {positions[k + 1]:.2f} mm)"
        )
    if len(missing) > 3:
        reasons.append(f"... and {len(missing) - 3} more gaps")
    irregular = ~regular
    irregular[missing] = False
    is_uneven = bool(irregular.any())
    if is_uneven and uneven == "refuse":
        reasons.append(
            f"uneven slice spacing: {int(irregular.sum())} of {steps.size} steps differ from "
            f"the median {median:.3f} mm by more than {tol:.3f} mm (steps from "
            f"{steps.min():.3f} to {steps.max():.3f} mm); pass uneven='keep' to keep "
            f"the slices at their own positions"
        )
    return reasons, is_uneven


def _tilt(
    offsets: np.ndarray, heights: np.ndarray, pixel: float, tilt: str, header_tilt: object
) -> tuple[list[str], float | None, np.ndarray | None]:
    """Check in-plane drift of the positions along the normal (gantry tilt).

    ``offsets``: (n, 2) in-plane (row, col direction) offsets of each position from
    slice 0's; ``heights``: (n,) positions along the normal relative to slice 0.
    Returns (reasons, tilt angle in degrees or None, drift per mm along the normal).
    """
    if offsets.shape[0] < 2:
        return [], None, None
    drift = float(np.max(np.linalg.norm(offsets, axis=1)))
    tol = TILT_TOL_PIXELS * pixel
    if drift <= tol:
        return [], None, None
    # Least squares through slice 0: offsets ~ heights * slope (2,)
    denom = float(heights @ heights)
    slope = (heights @ offsets) / denom if denom > 0 else np.zeros(2)
    residual = float(np.max(np.linalg.norm(offsets - np.outer(heights, slope), axis=1)))
    angle = math.degrees(math.atan(float(np.linalg.norm(slope))))
    reasons: list[str] = []
    if residual > tol:
        reasons.append(
            f"slice positions do not lie on one line: in-plane offsets up to {drift:.2f} mm "
            f"that a constant tilt does not explain (residual {residual:.2f} mm)"
        )
    elif tilt == "refuse":
        header = f", GantryDetectorTilt {header_tilt}" if header_tilt is not None else ""
        reasons.append(
            f"gantry tilt: positions drift {float(np.linalg.norm(slope)):.3f} mm in-plane per mm "
            f"along the normal ({angle:.2f} degrees{header}; {drift:.1f} mm over the series); "
            f"pass tilt='keep' to keep the slices as acquired"
        )
    return reasons, angle, slope


# --------------------------------------------------------------------------- the loader


@dataclass(frozen=True, slots=True)
class _Geometry:
    order: list[int]  # file index of slice k
    rows: int
    cols: int
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    heights: np.ndarray  # (n,) sorted positions along the normal
    origin: np.ndarray
    spacing: tuple[float, float, float]
    metadata: dict[str, object]


def load_series(
    paths: Sequence[Path],
    *,
    workers: int | None = None,
    uneven: Literal["refuse", "keep"] = "refuse",
    tilt: Literal["refuse", "keep"] = "refuse",
    allocate: Callable[[tuple[int, int, int]], np.ndarray] | None = None,
) -> Volume:
    """Load the files of one image series as a :class:`Volume` (PS3.3 C.7.6.2, C.11.1).

    ``paths``: the instances of one series, in any order. ``workers``: threads that
    decode encapsulated (compressed) pixel data (default ``min(8, cpu count)``; 1
    decodes in this thread); headers and native pixel data are read in this thread.
    ``uneven``/``tilt``: ``'refuse'`` (default) or ``'keep'``, see the module
    docstring. ``allocate(shape)``: returns the (uninitialised) C-contiguous float32
    array the volume is written into, e.g. a buffer kept from an earlier job, whose
    memory is already mapped (a fresh 300 MB array costs the first load of a process
    up to a second of page faults); default ``np.empty``. Raises InconsistentSeriesError listing every reason the files do not
    form one volume, InvalidInstanceError for a file that cannot be read or decoded,
    ValueError naming a bad argument.
    """
    if isinstance(paths, (str, Path)) or not paths:
        raise ValueError("paths: expected a non-empty sequence of file paths")
    if uneven not in ("refuse", "keep"):
        raise ValueError(f"uneven: expected 'refuse' or 'keep', got {uneven!r}")
    if tilt not in ("refuse", "keep"):
        raise ValueError(f"tilt: expected 'refuse' or 'keep', got {tilt!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    files = [Path(p) for p in paths]
    decoders.register()  # the 12-bit JPEG Extended plugin, before any slice is decoded

    # Headers in this thread: from the page cache, reading + walking is faster serially
    # than handed to threads that contend for the GIL (measured, bench/volume.py).
    items = [read_slice(path) for path in files]
    geometry = _geometry(items, uneven, tilt)
    rows, cols = geometry.rows, geometry.cols
    shape = (len(items), rows, cols)
    array = np.empty(shape, dtype=np.float32) if allocate is None else allocate(shape)
    if array.shape != shape or array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError(f"allocate: returned {array.dtype} {array.shape}, expected a "
                         f"C-contiguous float32 array of shape {shape}")
    sorted_items = [items[i] for i in geometry.order]

    def fill(k: int) -> None:
        item = sorted_items[k]
        stored = stored_values(item, rows, cols)
        slope = float(item.get("RescaleSlope", 1.0))  # type: ignore[arg-type]
        intercept = float(item.get("RescaleIntercept", 0.0))  # type: ignore[arg-type]
        rescale_into(stored, slope, intercept, array[k])
        item.data = None  # let the file's bytes go as soon as they are used
        item.dataset = None

    # Native slices: one copy-convert each, memory-bound, here. Encapsulated slices:
    # decoded by pydicom's plugins in a thread pool.
    native = [k for k, item in enumerate(sorted_items) if item.pixel_offset >= 0]
    encoded = [k for k, item in enumerate(sorted_items) if item.pixel_offset < 0]
    for k in native:
        fill(k)
    if len(encoded) > 1 and workers > 1:
        with ThreadPoolExecutor(min(workers, len(encoded)), thread_name_prefix="load_series") as pool:
            list(pool.map(fill, encoded))
    else:
        for k in encoded:
            fill(k)
    logger.debug("loaded %d slices (%d native, %d encapsulated)", len(items), len(native), len(encoded))
    return _build_volume(array, sorted_items, geometry)


def _geometry(items: list[Slice], uneven: str, tilt: str) -> _Geometry:
    """Check that ``items`` form one volume and work out its geometry, or refuse."""
    n = len(items)
    reasons: list[str] = []
    names = [item.path.name for item in items]

    frames = [item.get("NumberOfFrames", 1) for item in items]
    multi = [name for name, f in zip(names, frames, strict=True) if isinstance(f, int) and f > 1]
    if multi:
        reasons.append(
            f"multi-frame instances are not supported yet ({len(multi)} file(s), e.g. {multi[0]} "
            f"with {frames[names.index(multi[0])]} frames): Enhanced CT/MR geometry is per frame"
        )
    no_pixels = [item.path.name for item in items if not item.has_pixel_data]
    if no_pixels:
        reasons.append(f"no Pixel Data in {len(no_pixels)} file(s), e.g. {no_pixels[0]}")
    _check_same(items, "SeriesInstanceUID", "series (SeriesInstanceUID)", reasons)
    _check_same(items, "FrameOfReferenceUID", "frame of reference (FrameOfReferenceUID)", reasons)
    _check_same(items, "Rows", "image size (Rows)", reasons)
    _check_same(items, "Columns", "image size (Columns)", reasons)
    _check_same(items, "PhotometricInterpretation", "photometric interpretation", reasons)
    samples = {item.get("SamplesPerPixel", 1) for item in items}
    if samples != {1}:
        reasons.append(f"only grayscale images (SamplesPerPixel 1) are supported, found {sorted(map(str, samples))}")
    if any(item.get("_modality_lut_sequence", False) for item in items):
        reasons.append("a Modality LUT Sequence (0028,3000) is not supported; only Rescale Slope/Intercept")

    iops = [_vector(item, "ImageOrientationPatient", 6) for item in items]
    ipps = [_vector(item, "ImagePositionPatient", 3) for item in items]
    spacings = [_vector(item, "PixelSpacing", 2) for item in items]
    for keyword, values in (("ImagePositionPatient", ipps), ("ImageOrientationPatient", iops),
                            ("PixelSpacing", spacings)):
        absent = [name for name, v in zip(names, values, strict=True) if v is None]
        if absent:
            reasons.append(f"missing or invalid {keyword} in {len(absent)} file(s), e.g. {absent[0]}")
    if reasons:
        raise InconsistentSeriesError(reasons)

    iop_all = np.stack(iops)  # type: ignore[arg-type]
    ps_all = np.stack(spacings)  # type: ignore[arg-type]
    iop0, ps0 = iop_all[0], ps_all[0]
    off_orientation = int(np.sum(np.any(np.abs(iop_all - iop0) > ORIENTATION_ATOL, axis=1)))
    if off_orientation:
        reasons.append(
            f"mixed orientation: {off_orientation} file(s) differ from {names[0]}'s "
            f"ImageOrientationPatient by more than {ORIENTATION_ATOL}"
        )
    if np.any(np.abs(ps_all - ps0) > PIXEL_SPACING_RTOL * np.abs(ps0)):
        reasons.append("mixed pixel spacing (PixelSpacing)")
    row, col = iop0[:3], iop0[3:]
    if (abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01
            or abs(float(row @ col)) > 0.01):
        reasons.append(f"ImageOrientationPatient is not two orthogonal unit vectors: {iop0.tolist()}")
    if ps0.min() <= 0:
        reasons.append(f"PixelSpacing must be positive, got {ps0.tolist()}")
    if reasons:
        raise InconsistentSeriesError(reasons)

    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.stack(ipps)  # type: ignore[arg-type]
    heights = positions @ normal
    order = [int(i) for i in np.argsort(heights, kind="stable")]
    heights = heights[order]
    positions = positions[order]
    sorted_names = [names[i] for i in order]

    spacing_reasons, is_uneven = _spacing_reasons(heights, sorted_names, uneven)
    reasons += spacing_reasons
    rel = positions - positions[0]
    offsets = np.stack([rel @ row, rel @ col], axis=1)
    header_tilt = items[order[0]].get("GantryDetectorTilt")
    tilt_reasons, angle, drift = _tilt(offsets, heights - heights[0], float(ps0.min()), tilt, header_tilt)
    if not spacing_reasons or not spacing_reasons[0].startswith("duplicated"):
        reasons += tilt_reasons
    if reasons:
        raise InconsistentSeriesError(reasons)

    first = items[order[0]]
    if n > 1:
        slice_spacing = float(heights[-1] - heights[0]) / (n - 1)
    else:
        fallback = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_spacing = float(fallback)  # type: ignore[arg-type]
    metadata: dict[str, object] = {
        "image_positions": positions,
        "photometric_interpretation": str(first.get("PhotometricInterpretation", "")),
        "transfer_syntaxes": tuple(sorted({item.transfer_syntax for item in items})),
        "instance_numbers": tuple(items[i].get("InstanceNumber") for i in order),
    }
    if is_uneven:
        steps = np.diff(heights)
        metadata["uneven_spacing"] = True
        metadata["slice_steps"] = steps
        logger.info("uneven slice spacing kept: steps %.3f..%.3f mm", steps.min(), steps.max())
    if angle is not None and drift is not None:
        direction = normal + drift[0] * row + drift[1] * col
        metadata["gantry_tilt_deg"] = angle
        metadata["stack_direction"] = direction / np.linalg.norm(direction)
        logger.info("gantry tilt %.2f degrees kept: slices as acquired (sheared)", angle)
    image_type = first.get("ImageType")
    if isinstance(image_type, list) and "MOSAIC" in image_type:
        metadata["mosaic"] = True
        logger.warning("mosaic image loaded as acquired (tiles are not unpacked)")
    if metadata["photometric_interpretation"] == "MONOCHROME1":
        logger.info("MONOCHROME1 series: values are rescaled modality values, not inverted")
    return _Geometry(
        order=order,
        rows=int(first.get("Rows")),  # type: ignore[call-overload]
        cols=int(first.get("Columns")),  # type: ignore[call-overload]
        row=row, col=col, normal=normal, heights=heights, origin=positions[0],
        spacing=(slice_spacing, float(ps0[0]), float(ps0[1])),
        metadata=metadata,
    )


def _build_volume(array: np.ndarray, items: list[Slice], geometry: _Geometry) -> Volume:
    first = items[0]
    return Volume(
        array=array,
        origin=np.asarray(geometry.origin, dtype=float),
        row_direction=geometry.row,
        col_direction=geometry.col,
        slice_direction=geometry.normal,
        spacing=geometry.spacing,
        slice_positions=np.asarray(geometry.heights, dtype=float),
        sop_instance_uids=tuple(str(item.get("SOPInstanceUID", "")) for item in items),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        metadata=geometry.metadata,
    )
