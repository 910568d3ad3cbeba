"""The status page's picture of a result: the segments' contours over a representative
source slice, rendered on the server as PNG.

The slice is the one where the model segmented the largest area; it is read from the
stored source instance and windowed as the secondary-capture fallback windows it
(:func:`dicomnode.encode.sc.modality_values`, :func:`~dicomnode.encode.sc.choose_window`:
the lung window for a lung model on CT, else the data set's window, else percentiles).
The contours are those the GSPS fallback writes (:func:`dicomnode.encode.gsps.label_contours`:
closed polylines along the labelled pixels' edges, PS3.3 C.10.5 PIXEL coordinates), drawn
1:1 in each label's manifest colour after the slice is scaled to the thumbnail, without
anti-aliasing, so that every contour pixel has exactly its label's colour.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dicomnode.core.index import Index
from dicomnode.core.manifest import Manifest, load_manifest
from dicomnode.core.records import InferenceResult

LOG = logging.getLogger(__name__)

SIDE = 256
#: colours for labels a manifest does not colour (or when it cannot be read)
_FALLBACK = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))


class OverlayError(Exception):
    """The overlay cannot be made (the result's labels or source slice are gone)."""


def representative_slice(labels: np.ndarray) -> int:
    """The index of the slice with the largest labelled area."""
    areas = np.count_nonzero(labels.reshape(labels.shape[0], -1), axis=1)
    return int(np.argmax(areas))


def label_colors(manifest: Manifest | None, values: list[int]) -> dict[int, tuple[int, int, int]]:
    known = {lab.value: tuple(lab.color) for lab in manifest.labels} if manifest else {}
    return {v: known.get(v) or _FALLBACK[(v - 1) % len(_FALLBACK)]  # type: ignore[misc]
            for v in values}


def render_overlay(result: InferenceResult, storage: Path, index: Index,
                   models_dir: Path | None, side: int = SIDE) -> bytes:
    """The PNG overlay of one inference result (see the module docstring)."""
    import pydicom

    from dicomnode.encode.gsps import label_contours
    from dicomnode.encode.sc import choose_window, modality_values

    try:
        labels = result.load_labels(storage)
    except (OSError, ValueError, KeyError) as exc:
        raise OverlayError(f"the labels of the result cannot be read: {exc}") from None
    if labels.ndim != 3 or labels.shape[0] != len(result.sop_instance_uids):
        raise OverlayError("the labels do not match the source slices")
    k = representative_slice(labels)
    rows = index.instances(sop_uid=result.sop_instance_uids[k])
    if not rows:
        raise OverlayError("the source slice is no longer stored")
    src = pydicom.dcmread(storage / rows[0].path)
    values = modality_values(src)
    if values.shape != labels.shape[1:]:
        raise OverlayError("the source slice does not match the labels")
    manifest = _manifest(models_dir, result.model)
    if manifest is not None:
        center, width = choose_window(manifest, src, values)
    else:
        lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
        center, width = (lo + hi) / 2, max(1.0, hi - lo)
    gray = np.clip((values - (center - width / 2)) / width, 0.0, 1.0) * 255.0
    if src.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255.0 - gray
    image = Image.fromarray(gray.astype(np.uint8), "L")
    scale = min(1.0, side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    present = sorted(int(v) for v in np.unique(labels[k]) if v)
    for value, color in label_colors(manifest, present).items():
        for contour in label_contours(labels[k] == value):
            points = [(float(x) * scale, float(y) * scale) for x, y in contour]
            draw.line(points, fill=color, width=2)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _manifest(models_dir: Path | None, model: str) -> Manifest | None:
    if models_dir is None:
        return None
    try:
        return load_manifest(Path(models_dir) / model)
    except Exception as exc:  # a model folder removed or changed since the job ran
        LOG.warning("no manifest for model %s: %s", model, exc)
        return None


class OverlayCache:
    """Overlays made once per result (a result never changes), the newest kept."""

    def __init__(self, size: int = 64) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, key: str) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
            return png

    def put(self, key: str, png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
