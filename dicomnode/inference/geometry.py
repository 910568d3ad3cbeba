"""The Volume: a series as a 3-D array with its patient geometry (PS3.3 C.7.6.2).

Conventions (used by every model and by the SEG encoder):

* ``array[k, i, j]``: slice ``k`` (sorted along the slice normal, increasing),
  row ``i``, column ``j``; float32 after Rescale Slope/Intercept (HU for CT).
* ``row_direction`` = ImageOrientationPatient[0:3], the patient direction of
  increasing column index ``j``; ``col_direction`` = IOP[3:6], of increasing row
  index ``i``; ``slice_direction`` = their cross product, of increasing ``k``.
* ``spacing`` = (slice spacing, spacing between rows, spacing between columns) in mm
  (PixelSpacing[0] is between rows, PixelSpacing[1] between columns).
* Patient coordinates are DICOM LPS: +x towards the patient's left, +y posterior,
  +z head.
* ``sop_instance_uids[k]`` is the source instance of slice ``k`` (for results that
  must land on the source frames exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    array: np.ndarray
    origin: np.ndarray  # ImagePositionPatient of slice 0, mm (LPS)
    row_direction: np.ndarray  # unit (3,)
    col_direction: np.ndarray  # unit (3,)
    slice_direction: np.ndarray  # unit (3,)
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    slice_positions: np.ndarray  # (n,) position of each slice along slice_direction, mm
    sop_instance_uids: tuple[str, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str = ""
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        k, i, j = self.array.shape
        return int(k), int(i), int(j)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (k, i, j, 1) to patient LPS (x, y, z, 1) in mm."""
        m = np.eye(4)
        m[:3, 0] = self.slice_direction * self.spacing[0]
        m[:3, 1] = self.col_direction * self.spacing[1]
        m[:3, 2] = self.row_direction * self.spacing[2]
        m[:3, 3] = self.origin
        return m

    def index_to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) of voxel indices (N, 3) given as (k, i, j)."""
        kij = np.asarray(kij, dtype=float)
        return kij @ self.affine[:3, :3].T + self.affine[:3, 3]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0
