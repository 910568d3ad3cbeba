"""Synthetic image series in any orientation, from a phantom defined in patient space.

A phantom is a function of patient coordinates (DICOM LPS, mm; PS3.3 C.7.6.2.1.1):
``field(points (N, 3)) -> values (N,)``. A :class:`SeriesGeometry` says where the
pixels of each slice lie (Image Orientation / Position / Pixel Spacing, PS3.3
C.7.6.2), so one anatomy can be written as an axial head-first, feet-first, mirrored,
tilted, sagittal, coronal or decubitus series, and every orientation must give the
same labels in the patient. ``chest_phantom`` is a chest with two lungs, airway,
mediastinum, spine, table and abdominal gas, with random variation, for training and
testing lung models; no patient data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicomnode.inference.geometry import Volume

_ROOT = "2.25."
Field = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SeriesGeometry:
    """Where the pixels of a series lie: rows x cols pixels, ``slices`` slices.

    ``row_direction``/``col_direction``: ImageOrientationPatient[0:3] / [3:6];
    ``step``: ImagePositionPatient of slice n+1 minus that of slice n (along the
    normal, or sheared for gantry tilt); ``origin``: IPP of slice 0;
    ``pixel_spacing``: (between rows, between columns) mm.
    """

    rows: int
    cols: int
    slices: int
    row_direction: tuple[float, float, float]
    col_direction: tuple[float, float, float]
    step: tuple[float, float, float]
    origin: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    patient_position: str = "HFS"

    def positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, (slices, 3)."""
        return np.asarray(self.origin) + np.outer(np.arange(self.slices), self.step)

    def slice_points(self, n: int) -> np.ndarray:
        """Patient coordinates of every pixel of slice ``n``, (rows, cols, 3)."""
        i, j = np.mgrid[0 : self.rows, 0 : self.cols]
        return (
            self.positions()[n]
            + i[..., None] * self.pixel_spacing[0] * np.asarray(self.col_direction)
            + j[..., None] * self.pixel_spacing[1] * np.asarray(self.row_direction)
        )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def oriented(
    kind: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    tilt_deg: float = 18.5,
    angle_deg: float = 0.0,
) -> SeriesGeometry:
    """A geometry of ``shape`` (slices, rows, cols) and ``spacing`` (slice step, row,
    column mm) centred on ``centre`` (LPS mm). ``kind``:

    * ``axial_hfs``: IOP (1,0,0, 0,1,0), slices from the feet up (normal +z);
    * ``axial_ffs``: IOP (-1,0,0, 0,1,0) (the row direction mirrored, as a feet-first
      acquisition is seen from the feet), normal -z;
    * ``axial_mirrored``: IOP (1,0,0, 0,-1,0): columns run posterior to anterior;
    * ``axial_rotated``: IOP (-1,0,0, 0,-1,0): rotated 180 degrees in plane;
    * ``tilted``: gantry tilt ``tilt_deg`` about x: IOP (1,0,0, 0,cos,-sin) with the
      slices stepping along z (a sheared stack, as CT with a tilted gantry);
    * ``sagittal``: IOP (0,1,0, 0,0,-1); ``coronal``: IOP (1,0,0, 0,0,-1);
    * ``decubitus_left`` / ``decubitus_right``: axial planes rotated 90 degrees in
      plane (patient on the left / right side): IOP (0,-1,0, 1,0,0) / (0,1,0, -1,0,0);
    * ``oblique``: axial rotated ``angle_deg`` about z and tilted 10 degrees about x.
    """
    n, rows, cols = shape
    step_mm, row_mm, col_mm = spacing
    c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
    position = {
        "decubitus_left": "HFDL", "decubitus_right": "HFDR", "axial_ffs": "FFS",
    }.get(kind, "HFS")
    stack: np.ndarray | None = None
    if kind == "axial_hfs":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    elif kind == "axial_ffs":
        row, col = np.array([-1.0, 0, 0]), np.array([0, 1.0, 0])
    elif kind == "axial_mirrored":
        row, col = np.array([1.0, 0, 0]), np.array([0, -1.0, 0])
    elif kind == "axial_rotated":
        row, col = np.array([-1.0, 0, 0]), np.array([0, -1.0, 0])
    elif kind == "tilted":
        row, col = np.array([1.0, 0, 0]), np.array([0, c, -s])
        stack = np.array([0, 0, step_mm / c])  # along the table: normal step step_mm
    elif kind == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    elif kind == "coronal":
        row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    elif kind == "decubitus_left":
        row, col = np.array([0, -1.0, 0]), np.array([1.0, 0, 0])
    elif kind == "decubitus_right":
        row, col = np.array([0, 1.0, 0]), np.array([-1.0, 0, 0])
    elif kind == "oblique":
        a = np.radians(angle_deg)
        t = np.radians(10.0)
        row = np.array([np.cos(a), np.sin(a), 0.0])
        col = _unit(np.array([-np.sin(a), np.cos(a), 0.0]) * np.cos(t) + np.array([0, 0, -np.sin(t)]))
    else:
        raise ValueError(f"kind: unknown orientation {kind!r}")
    normal = np.cross(row, col)
    if stack is None:
        stack = normal * step_mm
    centre_v = np.asarray(centre, dtype=float)
    origin = (
        centre_v
        - row * col_mm * (cols - 1) / 2
        - col * row_mm * (rows - 1) / 2
        - stack * (n - 1) / 2
    )
    return SeriesGeometry(
        rows=rows, cols=cols, slices=n,
        row_direction=tuple(row.tolist()), col_direction=tuple(col.tolist()),
        step=tuple(np.asarray(stack, dtype=float).tolist()), origin=tuple(origin.tolist()),
        pixel_spacing=(row_mm, col_mm), patient_position=position,
    )


def sample(geometry: SeriesGeometry, field: Field) -> np.ndarray:
    """The field on the geometry's pixels, (slices, rows, cols) float32, slice order."""
    out = np.empty((geometry.slices, geometry.rows, geometry.cols), dtype=np.float32)
    for n in range(geometry.slices):
        pts = geometry.slice_points(n).reshape(-1, 3)
        out[n] = field(pts).reshape(geometry.rows, geometry.cols)
    return out


def write_series(
    out_dir: Path,
    geometry: SeriesGeometry,
    field: Field,
    *,
    modality: str = "CT",
    noise: float = 0.0,
    seed: int = 0,
    reverse_instances: bool = False,
    description: str = "SYNTHETIC",
    study_uid: str | None = None,
) -> list[Path]:
    """Write the field as a single-frame CT (HU, rescale -1024) or MR series.

    ``reverse_instances``: instance 1 is the last slice of the geometry (as a table
    moving the other way writes it). Returns the paths in slice order.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    values = sample(geometry, field)
    if noise > 0:
        values = values + rng.normal(0.0, noise, values.shape).astype(np.float32)
    study_uid = study_uid or generate_uid(prefix=_ROOT)
    series_uid = generate_uid(prefix=_ROOT)
    frame_uid = generate_uid(prefix=_ROOT)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    intercept = -1024.0 if modality == "CT" else 0.0
    positions = geometry.positions()
    iop = [*geometry.row_direction, *geometry.col_direction]
    paths = []
    for n in range(geometry.slices):
        stored = np.clip(np.rint(values[n] - intercept), 0, 4095).astype(np.uint16)
        sop_uid = generate_uid(prefix=_ROOT)
        number = geometry.slices - n if reverse_instances else n + 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "SYNTHETIC^PHANTOM", "SYNTH0002"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, number
        ds.StudyDescription = "SYNTHETIC CHEST"
        ds.SeriesDescription = description
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "dicomnode synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.PatientPosition = geometry.patient_position
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[n]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
        ds.PixelSpacing = list(geometry.pixel_spacing)
        ds.SliceThickness = float(np.linalg.norm(geometry.step))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = geometry.rows, geometry.cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
            ds.KVP = 120
        ds.PositionReferenceIndicator = ""
        ds.PixelData = stored.tobytes()
        path = out_dir / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- phantoms


def _ellipsoid(p: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return np.sum(((p - centre) / radii) ** 2, axis=1) <= 1.0


def _cylinder_z(p: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Elliptic cylinder along z: ``radii`` (x, y)."""
    return ((p[:, 0] - centre[0]) / radii[0]) ** 2 + ((p[:, 1] - centre[1]) / radii[1]) ** 2 <= 1.0


def blocks_phantom() -> Field:
    """Piecewise-constant, asymmetric test object (HU): body, two unequal air
    'lungs', a bright 'spine' posterior, a bright marker anterior-left-superior."""

    def field(p: np.ndarray) -> np.ndarray:
        hu = np.full(p.shape[0], -1000.0, dtype=np.float32)
        hu[_cylinder_z(p, np.array([0.0, 0.0]), np.array([70.0, 50.0])) & (np.abs(p[:, 2]) < 60)] = 40.0
        hu[_ellipsoid(p, np.array([-30.0, -5.0, 5.0]), np.array([22.0, 30.0, 40.0]))] = -850.0
        hu[_ellipsoid(p, np.array([32.0, -5.0, -5.0]), np.array([16.0, 26.0, 30.0]))] = -850.0
        hu[_ellipsoid(p, np.array([0.0, 35.0, 0.0]), np.array([10.0, 10.0, 50.0]))] = 700.0
        hu[_ellipsoid(p, np.array([35.0, -35.0, 35.0]), np.array([12.0, 10.0, 12.0]))] = 300.0
        return hu

    return field


def chest_phantom(rng: np.random.Generator, scale: float = 1.0) -> Field:
    """A random chest (HU, LPS mm, centred near the origin), for lung models.

    Body (elliptic cylinder), right and left lung (ellipsoids cut by a domed
    diaphragm; the right one larger, the heart indenting the left), trachea and main
    bronchi, mediastinum and heart, spine, vessels as bright blobs in the lungs,
    fat, the table below the back, gas in the stomach/bowel under the diaphragm and
    a low-density (emphysema-like) region sometimes. Sizes and positions vary.
    """
    s = scale * rng.uniform(0.8, 1.15)
    body_r = np.array([rng.uniform(140, 180), rng.uniform(95, 125)]) * s
    shift = np.array([rng.uniform(-20, 20), rng.uniform(-15, 15), rng.uniform(-25, 25)])
    lung_hu = rng.uniform(-900, -780)
    gap = rng.uniform(12, 30) * s
    r_lung = np.array([rng.uniform(55, 75), rng.uniform(65, 85), rng.uniform(110, 140)]) * s
    l_lung = r_lung * np.array([rng.uniform(0.8, 0.95), 1.0, rng.uniform(0.92, 1.0)])
    r_c = shift + np.array([-(gap + r_lung[0]), rng.uniform(-5, 10), 0.0])
    l_c = shift + np.array([gap + l_lung[0], rng.uniform(-5, 10), rng.uniform(5, 15)])
    heart_c = shift + np.array([rng.uniform(15, 35), -rng.uniform(25, 45), -rng.uniform(30, 55)])
    heart_r = np.array([55.0, 45.0, 50.0]) * s
    dome = shift[2] - r_lung[2] * rng.uniform(0.55, 0.75)
    vessels = [
        (c + rng.normal(0, 1, 3) * r * 0.5, rng.uniform(2.5, 6.0))
        for c, r in ((r_c, r_lung), (l_c, l_lung)) for _ in range(int(rng.integers(6, 16)))
    ]
    gas = [
        (shift + np.array([rng.uniform(-60, 90), rng.uniform(-60, 10), dome - rng.uniform(15, 60)]),
         rng.uniform(8, 25))
        for _ in range(int(rng.integers(0, 4)))
    ]
    emphysema = rng.random() < 0.4
    emph_c = (r_c if rng.random() < 0.5 else l_c) + rng.normal(0, 15, 3)
    trachea_r = rng.uniform(7, 11) * s
    table_y = shift[1] + body_r[1] + rng.uniform(5, 25)

    def field(p: np.ndarray) -> np.ndarray:
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        hu = np.full(p.shape[0], -1000.0, dtype=np.float32)
        body = _cylinder_z(p, shift, body_r)
        inner = _cylinder_z(p, shift, body_r - 12.0)
        hu[body] = -90.0  # subcutaneous fat
        hu[inner] = 40.0  # muscle / soft tissue
        hu[(y > table_y) & (y < table_y + 12) & (np.abs(x - shift[0]) < body_r[0] * 1.2)] = 200.0
        below = z < dome + 25.0 * (1 - ((x - shift[0]) / body_r[0]) ** 2)
        right = _ellipsoid(p, r_c, r_lung) & ~below & inner
        left = _ellipsoid(p, l_c, l_lung) & ~below & inner & ~_ellipsoid(p, heart_c, heart_r)
        hu[right | left] = lung_hu
        if emphysema:
            hu[(right | left) & _ellipsoid(p, emph_c, np.array([30.0, 30.0, 30.0]))] = -965.0
        for c, r in vessels:
            hu[(right | left) & _ellipsoid(p, c, np.array([r, r, 3 * r]))] = 30.0
        hu[_ellipsoid(p, heart_c, heart_r) & inner] = 45.0
        carina = shift[2] + rng_carina
        trachea = (
            ((x - shift[0]) ** 2 + (y - shift[1] + 15) ** 2 <= trachea_r**2) & (z > carina) & inner
        )
        for side in (-1.0, 1.0):
            t = np.clip((carina - z) / 40.0, 0, 1)
            bx = shift[0] + side * 35.0 * t
            trachea |= ((x - bx) ** 2 + (y - shift[1] + 15) ** 2 <= (0.75 * trachea_r) ** 2) & (
                z <= carina) & (z > carina - 40.0) & inner
        hu[trachea] = -1000.0
        hu[_cylinder_z(p, shift + np.array([0.0, body_r[1] - 35.0, 0.0]), np.array([16.0, 16.0])) & inner] = 500.0
        for c, r in gas:
            hu[_ellipsoid(p, c, np.array([r, 0.8 * r, 0.6 * r])) & inner] = -1000.0
        return hu

    rng_carina = rng.uniform(10, 40) * s
    return field


def to_volume(geometry: SeriesGeometry, values: np.ndarray, modality: str = "CT") -> Volume:
    """The Volume ``load_series`` would make of the series (without writing files)."""
    row = np.asarray(geometry.row_direction, dtype=float)
    col = np.asarray(geometry.col_direction, dtype=float)
    normal = np.cross(row, col)
    positions = geometry.positions()
    heights = positions @ normal
    order = np.argsort(heights)
    step = np.asarray(geometry.step, dtype=float)
    metadata: dict[str, object] = {"image_positions": positions[order]}
    if np.linalg.norm(np.cross(_unit(step), normal)) > 1e-6:
        metadata["stack_direction"] = _unit(step) * np.sign(step @ normal)
    n = geometry.slices
    return Volume(
        array=np.ascontiguousarray(values[order], dtype=np.float32),
        origin=positions[order[0]],
        row_direction=row, col_direction=col, slice_direction=normal,
        spacing=(float(abs(step @ normal)), *geometry.pixel_spacing),
        slice_positions=heights[order],
        sop_instance_uids=tuple(f"2.25.{k + 1}" for k in range(n)),
        study_uid="2.25.1", series_uid="2.25.2", frame_of_reference_uid="2.25.3",
        modality=modality,
    )
