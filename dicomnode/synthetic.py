"""Synthetic CT series for tests, benchmarks and the demo (no patient data).

The images are a body-shaped ellipse of soft tissue with two air-filled "lungs",
in Hounsfield units, stored as CT Image Storage with rescale slope/intercept, so
that later stages (volume loading, the lung model) have something plausible to
work on without any downloaded data.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_ROOT = "2.25."


def _phantom_slice(rows: int, cols: int, z: float, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    hu = np.full((rows, cols), -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    hu[body] = 40.0
    scale = max(0.2, 1 - abs(z))  # lungs shrink towards the apex and base
    for cx in (-0.38, 0.38):
        lung = ((x - cx) / (0.28 * scale)) ** 2 + (y / (0.45 * scale)) ** 2 <= 1
        hu[lung & body] = -850.0
    hu += rng.normal(0, 15, size=hu.shape)
    return hu


def make_ct_series(
    out_dir: Path,
    n_slices: int = 300,
    rows: int = 512,
    cols: int = 512,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    slice_thickness: float = 1.0,
    seed: int = 0,
) -> list[Path]:
    """Write an axial CT series of ``n_slices`` 16-bit slices; returns the paths."""
    rng = np.random.default_rng(seed)
    slices = (_phantom_slice(rows, cols, 2 * i / max(1, n_slices - 1) - 1, rng)
              for i in range(n_slices))
    return write_ct_series(
        out_dir, slices, n_slices=n_slices, rows=rows, cols=cols,
        pixel_spacing=350.0 / cols, slice_thickness=slice_thickness,
        study_uid=study_uid, series_uid=series_uid, series_number=series_number,
    )


def write_ct_series(
    out_dir: Path,
    slices_hu: Iterable[np.ndarray],
    *,
    n_slices: int,
    rows: int,
    cols: int,
    pixel_spacing: float,
    slice_thickness: float,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    study_description: str = "SYNTHETIC CHEST",
    series_description: str | None = None,
    patient_name: str = "SYNTHETIC^PHANTOM",
    patient_id: str = "SYNTH0001",
    window: tuple[float, float] | None = None,
) -> list[Path]:
    """Write ``n_slices`` axial HU slices (head last, field of view centred on the
    patient axis) as CT Image Storage files (PS3.3 A.3); returns the paths.
    ``window``: (center, width) in HU for the VOI LUT Module, none by default."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=_ROOT)
    series_uid = series_uid or generate_uid(prefix=_ROOT)
    frame_uid = generate_uid(prefix=_ROOT)
    corner = -pixel_spacing * cols / 2.0
    paths = []
    for i, hu in enumerate(slices_hu):
        if i >= n_slices:
            break
        if hu.shape != (rows, cols):
            raise ValueError(f"slices_hu: slice {i} is {hu.shape}, expected {(rows, cols)}")
        z = -n_slices * slice_thickness / 2 + i * slice_thickness
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        sop_uid = generate_uid(prefix=_ROOT)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = i + 1
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description or f"SYNTHETIC AXIAL {slice_thickness:g}mm"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "dicomnode synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [corner, corner, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_thickness
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PositionReferenceIndicator = ""
        ds.PixelData = stored.tobytes()
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
