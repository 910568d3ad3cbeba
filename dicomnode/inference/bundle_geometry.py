"""A Volume handed to MONAI as its own DICOM readers would load it, and labels back.

MONAI's DICOM readers (``ITKReader``, ``PydicomReader``; ``LoadImage`` with either)
return a series as an array indexed ``(x, y, z)`` = (column, row, slice), i.e.
``Volume.array`` ``(k, i, j)`` transposed, with an affine from those indices to
patient coordinates in mm, converted from DICOM LPS to RAS (``affine_lps_to_ras=True``,
their default: the first two rows of the LPS affine negated, PS3.3 C.7.6.2.1.1 for
the LPS patient frame), and ``meta['space'] = 'RAS'``. :func:`to_metatensor` builds
exactly that from a :class:`~dicomnode.inference.geometry.Volume`, so a bundle's
``Orientationd``, ``Spacingd``, crops and intensity transforms behave as on a file
``LoadImage`` read; :func:`labels_to_volume` takes a label map on that grid back to
the volume's ``(k, i, j)`` grid.

The slice axis of the affine is the step between consecutive slice *positions*
(ImagePositionPatient, ``Volume.metadata['image_positions']`` when the loader kept
them), not the slice normal: a series kept with gantry tilt gets a sheared affine,
which MONAI's ``Orientationd`` (nibabel ``io_orientation``) and ``Spacingd`` (a full
affine resampling) handle as the true geometry, so the labels still land on the
acquired slices. A stack whose slice steps are uneven cannot be written as one
affine: it is first resampled (linearly, along the stack) onto a regular stack with
the finest step of the series, and each source slice takes the labels of the
nearest regular slice (at most half that step away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.inference.geometry import Volume

if TYPE_CHECKING:
    import torch

#: LPS <-> RAS: negate x and y (MONAI ``orientation_ras_lps``).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: A stack is regular when every slice lies within this share of a step of the line
#: through the first and last slice (the loader accepts steps within 2 % of the median).
REGULAR_RTOL = 0.05
REGULAR_ATOL_MM = 0.01
#: An uneven stack is resampled to at most this many times its slice count.
MAX_RESAMPLE_FACTOR = 8


@dataclass(frozen=True)
class Handover:
    """How the array given to MONAI relates to the volume's ``(k, i, j)`` grid.

    ``source_index[k]``: the slice of the handed-over stack whose labels slice ``k``
    of the volume takes (identity for a regular stack).
    """

    shape: tuple[int, int, int]  # handed-over (x, y, z) spatial shape
    source_index: np.ndarray  # (n,) int
    resampled: bool


def slice_origins(volume: Volume) -> np.ndarray:
    """ImagePositionPatient of every slice ``(n, 3)`` (LPS mm), in the volume's order."""
    n = volume.shape[0]
    positions = volume.metadata.get("image_positions")
    if isinstance(positions, np.ndarray) and positions.shape == (n, 3):
        return positions.astype(float)
    heights = np.asarray(volume.slice_positions, dtype=float)
    if heights.shape != (n,):
        heights = np.arange(n) * volume.spacing[0]
    stack = volume.metadata.get("stack_direction")
    direction = np.asarray(stack, dtype=float) if stack is not None else volume.slice_direction
    along = float(direction @ volume.slice_direction)
    per_mm = direction / along if abs(along) > 1e-6 else volume.slice_direction
    return volume.origin[None, :] + np.outer(heights - heights[0], per_mm)


def _stack_step(origins: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, bool]:
    """(step vector between consecutive slices, whether the stack is regular)."""
    n = origins.shape[0]
    if n < 2:
        return fallback, True
    step = (origins[-1] - origins[0]) / (n - 1)
    expected = origins[0] + np.outer(np.arange(n), step)
    residual = float(np.max(np.linalg.norm(origins - expected, axis=1)))
    return step, residual <= max(REGULAR_ATOL_MM, REGULAR_RTOL * float(np.linalg.norm(step)))


def _regular_stack(
    array: np.ndarray, origins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resample an uneven stack linearly onto a regular one.

    Returns (array, first origin, step vector, source_index) where ``source_index[k]``
    is the regular slice nearest to source slice ``k``.
    """
    n = origins.shape[0]
    span = origins[-1] - origins[0]
    length = float(np.linalg.norm(span))
    unit = span / length
    t = (origins - origins[0]) @ unit  # distance of each slice along the stack, increasing
    finest = float(np.min(np.diff(t)))
    count = int(math.ceil(length / finest - 1e-6)) + 1
    count = min(count, MAX_RESAMPLE_FACTOR * n)
    grid = np.linspace(0.0, length, count)
    upper = np.clip(np.searchsorted(t, grid, side="right"), 1, n - 1)
    lower = upper - 1
    weight = ((grid - t[lower]) / (t[upper] - t[lower])).astype(np.float32)
    out = np.empty((count, *array.shape[1:]), dtype=np.float32)
    for m in range(count):
        w = float(weight[m])
        out[m] = array[lower[m]] * (1.0 - w) + array[upper[m]] * w
    step_len = length / (count - 1)
    source_index = np.clip(np.rint(t / step_len).astype(int), 0, count - 1)
    return out, origins[0], unit * step_len, source_index


def lps_affine(volume: Volume) -> tuple[np.ndarray, np.ndarray, Handover]:
    """The ``(x, y, z)`` array, its LPS affine and the handover record (no torch)."""
    if volume.array.ndim != 3:
        raise ValueError(f"volume.array must be 3-D (k, i, j), got shape {volume.array.shape}")
    n = volume.shape[0]
    origins = slice_origins(volume)
    step, regular = _stack_step(origins, volume.slice_direction * volume.spacing[0])
    array = volume.array
    source_index = np.arange(n)
    origin = origins[0]
    if not regular:
        array, origin, step, source_index = _regular_stack(array, origins)
    affine = np.eye(4)
    affine[:3, 0] = volume.row_direction * volume.spacing[2]  # x: increasing column j
    affine[:3, 1] = volume.col_direction * volume.spacing[1]  # y: increasing row i
    affine[:3, 2] = step  # z: increasing slice k
    affine[:3, 3] = origin
    xyz = np.asarray(array, dtype=np.float32).transpose(2, 1, 0)
    handover = Handover(shape=tuple(xyz.shape), source_index=source_index, resampled=not regular)
    return xyz, affine, handover


def to_metatensor(
    volume: Volume, *, lps_to_ras: bool = True, channel_first: bool = False
) -> tuple[Any, Handover]:
    """The volume as ``LoadImage`` would return it (a MONAI ``MetaTensor``).

    ``lps_to_ras``: RAS affine and ``meta['space'] = 'RAS'`` (MONAI's default for
    DICOM); False keeps LPS (``affine_lps_to_ras=False``). ``channel_first``: shape
    ``(1, x, y, z)`` (``LoadImage(ensure_channel_first=True)``), else ``(x, y, z)``
    with ``original_channel_dim`` "no channel" for ``EnsureChannelFirst`` to act on.
    """
    import torch
    from monai.data import MetaTensor

    xyz, affine, handover = lps_affine(volume)
    if lps_to_ras:
        affine = LPS_TO_RAS @ affine
    tensor = torch.from_numpy(xyz)
    meta: dict[str, Any] = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(xyz.shape),
        "spacing": np.linalg.norm(affine[:3, :3], axis=0),
        "space": "RAS" if lps_to_ras else "LPS",
        "original_channel_dim": float("nan"),
        "filename_or_obj": "dicomnode-volume",
    }
    if channel_first:
        tensor = tensor[None]
        meta["original_channel_dim"] = 0
    return MetaTensor(tensor, meta=meta), handover


def labels_to_volume(labels: torch.Tensor | np.ndarray, handover: Handover) -> np.ndarray:
    """A label map on the handed-over grid, ``(x, y, z)`` or ``(1, x, y, z)``, as ``(k, i, j)``."""
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != handover.shape:
        raise ValueError(
            f"bundle output has spatial shape {arr.shape}, expected the input grid "
            f"{handover.shape}: its postprocessing did not invert the preprocessing"
        )
    kij = arr.transpose(2, 1, 0)
    return np.ascontiguousarray(kij[handover.source_index])


def sub_volume(volume: Volume, k: slice, i: slice = slice(None), j: slice = slice(None)) -> Volume:
    """A block of ``volume`` (unit-step slices of k, i, j) with its own geometry.

    Used to hold out part of a series and to keep tests on real series small; every
    slice keeps its position (a tilted stack stays tilted) and its SOP Instance UID.
    """
    n, rows, cols = volume.shape
    ks, is_, js = (range(*s.indices(size)) for s, size in zip((k, i, j), (n, rows, cols), strict=True))
    if min(len(ks), len(is_), len(js)) == 0 or any(r.step != 1 for r in (ks, is_, js)):
        raise ValueError("sub_volume: non-empty, unit-step slices expected")
    shift = volume.col_direction * volume.spacing[1] * is_.start + (
        volume.row_direction * volume.spacing[2] * js.start
    )
    origins = slice_origins(volume)[ks.start : ks.stop] + shift
    metadata = {key: value for key, value in volume.metadata.items()
                if key not in ("image_positions", "slice_steps", "instance_numbers")}
    metadata["image_positions"] = origins
    return Volume(
        array=np.ascontiguousarray(volume.array[ks.start : ks.stop, is_.start : is_.stop,
                                                js.start : js.stop]),
        origin=origins[0],
        row_direction=volume.row_direction,
        col_direction=volume.col_direction,
        slice_direction=volume.slice_direction,
        spacing=volume.spacing,
        slice_positions=np.asarray(volume.slice_positions)[ks.start : ks.stop],
        sop_instance_uids=volume.sop_instance_uids[ks.start : ks.stop],
        study_uid=volume.study_uid,
        series_uid=volume.series_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        modality=volume.modality,
        sop_class_uid=volume.sop_class_uid,
        metadata=metadata,
    )
