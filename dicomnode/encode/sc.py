"""Viewer fallback 2: the labels burned into secondary-capture images.

For viewers that show neither DICOM-SEG nor presentation states: one Secondary
Capture Image (PS3.3 A.8.1, SOP class 1.2.840.10008.5.1.4.1.1.7) per source slice
that carries a label, RGB 8-bit, showing the windowed source slice with each label
blended in its colour (40 % alpha) and outlined (1 pixel), and "NOT FOR DIAGNOSTIC
USE", the model's name and version and a legend burned in (Burned In Annotation YES).

Why single-frame images and not one Multi-frame True Color SC: the multi-frame SC
IODs have no per-frame position, so a viewer could not sync them with the source;
single-frame images each carry the source slice's Image Position / Orientation,
Pixel Spacing and Frame of Reference (copied from the source; not part of the SC
IOD, so a standard extended SOP class), and old viewers - the ones that need this
fallback - show single-frame SC everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicomnode.core import decoders
from dicomnode.core.manifest import Manifest
from dicomnode.encode.base import EncodeInput, derived_uid
from dicomnode.encode.equipment import (
    MANUFACTURER,
    contributing_equipment,
    copy_body_part,
    device_serial_number,
    drop_incomplete_references,
    lo,
    model_title,
    series_number,
    software_versions,
)
from dicomnode.encode.gsps import (
    LUNG_WINDOW,
    check_labels,
    is_lung_ct,
)

logger = logging.getLogger(__name__)

ALPHA = 0.4
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
WARNING_COLOR = (255, 255, 0)  # the warning line, pure yellow
TEXT_COLOR = (255, 255, 255)
# geometry copied from the source slice so that viewers can sync the series
_GEOMETRY = ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
             "ImageOrientationPatient", "SliceThickness", "SliceLocation")


@dataclass(frozen=True)
class Frame:
    """One rendered frame: RGB uint8 (rows, columns, 3) and where the text block lies."""

    rgb: np.ndarray
    text_box: tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive


def encode_sc(inp: EncodeInput, window: tuple[float, float] | None = None) -> list[Dataset]:
    """Secondary Capture Images with the labels burned in, one per labelled source slice.

    Same study, a new series (``inp.uid('sc', 'series')``); instance UIDs derived from
    ``inp.uid('sc', 'instance')`` and the source instance's UID. ``window`` = (center,
    width) of the grayscale; by default the CT lung window for a lung model on CT,
    else the source slice's first Window Center/Width, else its 1st..99th percentile.
    Returns ``[]`` when no slice carries a label.
    """
    labels = check_labels(inp)
    manifest = inp.manifest
    title = model_title(manifest)
    series_uid = inp.uid("sc", "series")
    base_instance = inp.uid("sc", "instance")
    out = []
    for k in range(labels.shape[0]):
        if not labels[k].any():
            continue
        src = pydicom.dcmread(inp.source_paths[k])
        if int(src.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"source_paths: {Path(inp.source_paths[k]).name} is multi-frame; "
                             "expected one single-frame instance per slice")
        values = modality_values(src)
        if values.shape != labels.shape[1:]:
            raise ValueError(f"labels: slice {k} is {labels.shape[1:]}, its source image "
                             f"{Path(inp.source_paths[k]).name} is {values.shape}")
        win = choose_window(inp.manifest, src, values, window)
        frame = render_frame(values, labels[k], manifest, win,
                             invert=src.get("PhotometricInterpretation") == "MONOCHROME1")
        out.append(_sc_dataset(inp, src, frame.rgb, k, series_uid,
                               derived_uid(base_instance, src.SOPInstanceUID), title, win))
    if not out:
        logger.info("sc: no labelled slice, nothing to encode")
    return out


def modality_values(src: Dataset) -> np.ndarray:
    """The slice's stored values after Rescale Slope/Intercept (HU for CT), float32."""
    slope = float(src.get("RescaleSlope", 1) or 1)
    intercept = float(src.get("RescaleIntercept", 0) or 0)
    decoders.register()  # the source may be 12-bit JPEG Extended
    return src.pixel_array.astype(np.float32) * slope + intercept


def choose_window(manifest: Manifest, src: Dataset, values: np.ndarray,
                  window: tuple[float, float] | None = None) -> tuple[float, float]:
    """(center, width): the given one; the lung window for lung CT; the source's; percentiles."""
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if not width >= 1:
            raise ValueError(f"window: width must be >= 1, got {width}")
        return center, width
    if is_lung_ct(manifest, str(src.get("Modality", ""))):
        return LUNG_WINDOW
    if "WindowCenter" in src and "WindowWidth" in src:
        center, width = (_first(src.WindowCenter), _first(src.WindowWidth))
        if width >= 1:
            return center, width
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo + hi) / 2, max(1.0, hi - lo)


def _first(value: object) -> float:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def render_frame(values: np.ndarray, labels2d: np.ndarray, manifest: Manifest,
                 window: tuple[float, float], invert: bool = False) -> Frame:
    """The windowed slice with the labels blended and outlined and the text burned in."""
    center, width = window
    gray = np.clip((values - (center - width / 2)) / width, 0.0, 1.0) * 255.0
    if invert:
        gray = 255.0 - gray
    rgb = np.repeat(gray[..., None], 3, axis=2)
    present = []
    for lab in manifest.labels:
        mask = labels2d == lab.value
        if not mask.any():
            continue
        present.append(lab)
        color = np.asarray(lab.color, dtype=np.float32)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * color
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        rgb[edge] = color
    image = Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    box = _burn_text(image, [NOT_FOR_DIAGNOSTIC_USE, model_title(manifest)],
                     [(lab.name, tuple(lab.color)) for lab in present])
    return Frame(np.asarray(image), box)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _burn_text(image: Image.Image, lines: list[str],
               legend: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int, int, int]:
    """Draw the text block top left on a darkened background; returns its box.

    The block is rendered on a transparent layer first, at the largest font size (from
    1/28 of the image height down to 6 px) whose rendering fits the image's width.
    """
    cols, rows = image.size
    pad = 2
    size = max(8, rows // 28)
    while True:
        layer = _text_layer(image.size, lines, legend, size, pad)
        bbox = layer.getbbox()
        if bbox is None or bbox[2] + pad <= cols or size <= 6:
            break
        size -= 1
    if bbox is None:
        return (0, 0, 0, 0)
    right, bottom = min(cols, bbox[2] + pad), min(rows, bbox[3] + pad)
    # darken the block (to 40 %) so that the text reads on any image
    block = np.asarray(image.crop((0, 0, right, bottom)), dtype=np.float32) * 0.4
    image.paste(Image.fromarray(np.rint(block).astype(np.uint8), "RGB"), (0, 0))
    image.paste(layer, (0, 0), layer)
    return (0, 0, bottom, right)


def _text_layer(size_xy: tuple[int, int], lines: list[str],
                legend: list[tuple[str, tuple[int, ...]]], size: int, pad: int) -> Image.Image:
    layer = Image.new("RGBA", size_xy, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.fontmode = "1"  # no anti-aliasing: crisp at small sizes, exact colours
    font = _font(size)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 2)
    line_h = ascent + descent + 1
    swatch = max(4, ascent - 2)
    y = pad
    for i, text in enumerate(lines):
        draw.text((pad, y), text, fill=WARNING_COLOR if i == 0 else TEXT_COLOR, font=font)
        y += line_h
    for name, color in legend:
        top = y + (ascent - swatch) // 2 + 1
        draw.rectangle((pad, top, pad + swatch - 1, top + swatch - 1), fill=tuple(color))
        draw.text((pad + swatch + 3, y), name, fill=TEXT_COLOR, font=font)
        y += line_h
    return layer


def _patient_orientation(src: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) from Image Orientation: main axis letters."""
    iop = [float(v) for v in src.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(v: list[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return ("L", "P", "H")[axis] if v[axis] > 0 else ("R", "A", "F")[axis]

    return letter(iop[:3]), letter(iop[3:])


def _sc_dataset(inp: EncodeInput, src: Dataset, rgb: np.ndarray, k: int, series_uid: str,
                sop_uid: str, title: str, window: tuple[float, float]) -> Dataset:
    spacing = src.get("PixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number(src, "sc"),
        sop_instance_uid=sop_uid,
        instance_number=int(src.get("InstanceNumber") or (k + 1)),
        manufacturer=MANUFACTURER,
        # highdicom annotates tuple[int, int]; Pixel Spacing is DS (decimal) in PS3.3
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        patient_orientation=_patient_orientation(src),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(inp.manifest, inp.device)],
        manufacturer_model_name=lo(inp.manifest.name),
        software_versions=software_versions(inp.manifest),
        device_serial_number=device_serial_number(inp.manifest),
    )
    sc.copy_patient_and_study_information(src)
    copy_body_part(src, sc)
    drop_incomplete_references(sc)
    for keyword in _GEOMETRY:
        if keyword in src:
            sc[keyword] = src[keyword]
    sc.ConversionType = "WSD"  # workstation
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = title
    sc.SecondaryCaptureDeviceSoftwareVersions = software_versions(inp.manifest)
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "00"
    sc.SeriesDescription = lo(f"{title} overlay NOT FOR DIAGNOSTIC USE")
    sc.ImageComments = (f"{NOT_FOR_DIAGNOSTIC_USE}. Labels of {title} "
                        f"({', '.join(lab.name for lab in inp.manifest.labels)}) burned into "
                        f"the source image, window C {window[0]:g} W {window[1]:g}.")
    sc.DerivationDescription = lo(f"{title} labels blended into source")
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    purpose = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ref.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [ref]
    # Common Instance Reference Module (PS3.3 C.12.2): the source series this image shows
    instance = Dataset()
    instance.ReferencedSOPClassUID = src.SOPClassUID
    instance.ReferencedSOPInstanceUID = src.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    sc.ReferencedSeriesSequence = [series]
    return sc
