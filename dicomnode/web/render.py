"""Rendered images of stored instances: WADO-RS ``/rendered`` and ``/thumbnail``
(PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1), as JPEG or PNG.

One frame is read, the Modality LUT (Rescale Slope/Intercept) and a VOI window applied
(PS3.3 C.11.2.1.2, LINEAR; MONOCHROME1 inverted), and the result scaled to fit the
requested viewport, never larger than :data:`MAX_SIDE`:

* **window**: the ``window=center,width[,function]`` query parameter, else the data
  set's first Window Center/Width, else the 1st..99th percentile of the frame;
* **bounded**: a frame over :data:`MAX_PIXELS` is refused (413) before anything is
  decoded, as is a compressed one over :data:`MAX_DECODE_PIXELS` that cannot be
  decoded at a lower resolution; native (uncompressed) pixel data is read through a
  memory map, only every n-th row and column when the output is smaller (a huge image
  costs what its thumbnail needs); JPEG Baseline is decoded at 1/2, 1/4 or 1/8 of its
  size where that suffices (libjpeg's DCT scaling, through Pillow's ``draft``);
* **refused**: an object without pixel data (an SR, a KOS) is 406, a frame number out
  of range 404, pixel data shorter than its header announces 400.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dicomnode.core.dicomweb import HTTPError

LOG = logging.getLogger(__name__)

MAX_SIDE = 2048  # the largest rendered image side
THUMBNAIL_SIDE = 256  # a thumbnail's side, unless the viewport asks for less
MAX_PIXELS = 1 << 28  # ~268 Mpixel: a frame larger than this is not rendered
MAX_DECODE_PIXELS = 1 << 26  # ~67 Mpixel: compressed frames decoded whole up to this
MEDIA = ("image/jpeg", "image/png")
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What the request asks (PS3.18 8.3.5.1): media type, output box, window, quality."""

    media: str = "image/jpeg"
    viewport: tuple[int, int] | None = None
    window: tuple[float, float] | None = None
    quality: int = 90

    @classmethod
    def from_request(cls, params: Any, accept: str | None, *, thumbnail: bool = False
                     ) -> RenderOptions:
        """From the query parameters and the Accept header (or ``accept`` parameter);
        HTTPError 400 for a malformed parameter, 406 when neither JPEG nor PNG is
        acceptable."""
        media = choose_media(params.get("accept") or accept)
        viewport = None
        if params.get("viewport"):
            parts = params["viewport"].split(",")
            try:
                vw, vh = (int(p) for p in parts[:2])
            except ValueError:
                raise HTTPError(400, "viewport must be width,height in pixels") from None
            if len(parts) != 2 or vw < 1 or vh < 1:
                raise HTTPError(400, "viewport must be width,height (both >= 1)")
            viewport = (vw, vh)
        window = None
        if params.get("window"):
            parts = params["window"].split(",")
            try:
                center, width = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                raise HTTPError(400, "window must be center,width[,function]") from None
            function = parts[2].strip().lower() if len(parts) > 2 else "linear"
            if function not in ("linear", "linear-exact") or width <= 0 or len(parts) > 3:
                raise HTTPError(400, "window: width must be > 0 and the function linear or"
                                     " linear-exact")
            window = (center, width)
        quality = 90
        if params.get("quality"):
            q = params["quality"].strip()
            if not q.isdigit() or not 1 <= int(q) <= 100:
                raise HTTPError(400, "quality must be an integer from 1 to 100")
            quality = int(q)
        if viewport is None and thumbnail:
            viewport = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        return cls(media, viewport, window, quality)

    def box(self) -> tuple[int, int]:
        vw, vh = self.viewport or (MAX_SIDE, MAX_SIDE)
        return min(vw, MAX_SIDE), min(vh, MAX_SIDE)


def choose_media(accept: str | None) -> str:
    """image/jpeg or image/png from an Accept value (RFC 9110 12.5.1, q-values honoured);
    HTTPError 406 when neither is acceptable."""
    if not accept or not accept.strip():
        return "image/jpeg"
    best: tuple[float, int, str] | None = None
    for n, item in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in item.split(";"))
        media = media.lower()
        q = 1.0
        for p in params:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if media == "multipart/related":  # type="image/jpeg" inside
            inner = next((p.split("=", 1)[1].strip('"').lower() for p in params
                          if p.lower().startswith("type=")), "")
            media = inner
        candidates = {"*/*": MEDIA, "image/*": MEDIA}.get(media, (media,))
        for m in candidates:
            if m in MEDIA and q > 0 and (best is None or (q, -n) > (best[0], best[1])):
                best = (q, -n, m)
    if best is None:
        raise HTTPError(406, "only image/jpeg and image/png renderings are available")
    return best[2]


def render(path: Path, frame: int, opts: RenderOptions) -> bytes:
    """Frame ``frame`` (1-based) of the instance stored at ``path``, rendered."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception as exc:
        LOG.warning("cannot read %s for rendering: %s", path.name, exc)
        raise HTTPError(404, "not found") from None
    if "PixelData" not in ds:
        raise HTTPError(406, "the object has no pixel data: it has no image rendering")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows < 1 or cols < 1:
        raise HTTPError(400, "the image has no Rows/Columns")
    if not 1 <= frame <= frames:
        raise HTTPError(404, "no such frame")
    if rows * cols > MAX_PIXELS:
        raise HTTPError(413, f"the image is {cols}x{rows} pixels: too large to render")
    box = opts.box()
    step = max(1, min(cols // box[0], rows // box[1]))  # read no more than the box needs
    pixels = _read_frame(path, ds, frame, step)
    image = _to_image(ds, pixels, opts.window)
    image.thumbnail(box, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if opts.media == "image/png":
        image.save(out, "PNG", optimize=False)
    else:
        image.save(out, "JPEG", quality=opts.quality)
    return out.getvalue()


def _read_frame(path: Path, ds: Any, frame: int, step: int) -> np.ndarray:
    """The frame's stored values (every ``step``-th row and column where the format lets
    that be read directly), photometric as stored except that compressed color comes
    back RGB."""
    from pydicom.pixels import pixel_array

    from dicomnode.core import decoders

    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if ts in _NATIVE and bits in (8, 16, 32) and int(ds.get("PlanarConfiguration", 0) or 0) \
            == 0 and photometric in ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"):
        return _native(path, ds, frame, step, rows, cols, spp, bits)
    if ts == _JPEG_BASELINE and step > 1 and bits == 8:
        scaled = _jpeg_draft(path, ds, frame, step)
        if scaled is not None:
            return scaled
    if rows * cols > MAX_DECODE_PIXELS:
        raise HTTPError(413, f"the compressed image is {cols}x{rows} pixels: too large to"
                             " render")
    decoders.register()
    try:
        arr = pixel_array(str(path), index=frame - 1)
    except Exception as exc:
        LOG.warning("cannot decode frame %d of %s: %s", frame, path.name, exc)
        raise HTTPError(400, "the pixel data cannot be decoded") from None
    return np.asarray(arr)[::step, ::step]


def _native(path: Path, ds: Any, frame: int, step: int, rows: int, cols: int, spp: int,
            bits: int) -> np.ndarray:
    raw = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    per = rows * cols * spp * bits // 8
    length = int(getattr(raw, "length", 0) or 0)
    if offset is None or length == 0xFFFFFFFF:
        arr = np.asarray(ds.pixel_array)
        return (arr[frame - 1] if arr.ndim > (2 if spp == 1 else 3) else arr)[::step, ::step]
    if length < per * frame or path.stat().st_size < offset + per * frame:
        raise HTTPError(400, "the pixel data is shorter than the image its header describes")
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    shape = (rows, cols) if spp == 1 else (rows, cols, spp)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset + per * (frame - 1), shape=shape)
    try:
        return np.array(mm[::step, ::step])
    finally:
        del mm


def _jpeg_draft(path: Path, ds: Any, frame: int, step: int) -> np.ndarray | None:
    """A JPEG Baseline frame decoded at a reduced scale (1/2..1/8), or None."""
    from pydicom.encaps import get_frame

    raw = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    if offset is None:
        return None
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = get_frame(f, frame - 1, number_of_frames=int(ds.get("NumberOfFrames", 1)
                                                                   or 1))
        image = Image.open(io.BytesIO(data))
        scale = 1 << min(3, int(math.log2(step)))
        image.draft(image.mode, (max(1, image.width // scale), max(1, image.height // scale)))
        return np.asarray(image.convert("RGB" if image.mode not in ("L",) else "L"))
    except Exception as exc:  # fall back to the full decoder
        LOG.debug("reduced JPEG decode failed for %s: %s", path.name, exc)
        return None


def _to_image(ds: Any, values: np.ndarray, window: tuple[float, float] | None
              ) -> Image.Image:
    """8-bit grayscale (VOI window applied) or RGB."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if values.ndim == 3:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            values = apply_color_lut(values, ds)
        rgb = values.astype(np.float32)
        if rgb.max(initial=0) > 255:
            rgb = rgb * (255.0 / max(1.0, float(2 ** int(ds.get("BitsStored", 16)) - 1)))
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)[..., :3], "RGB")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return Image.fromarray(np.asarray(apply_color_lut(values, ds)).astype(np.uint8), "RGB")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    v = values.astype(np.float32) * slope + intercept
    center, width = window or _dataset_window(ds) or _percentile_window(v)
    # PS3.3 C.11.2.1.2.1, LINEAR
    gray = np.clip(((v - (center - 0.5)) / max(width - 1, 1) + 0.5) * 255.0, 0, 255)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
    return Image.fromarray(gray.astype(np.uint8), "L")


def _dataset_window(ds: Any) -> tuple[float, float] | None:
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        c = float(center[0] if isinstance(center, list | tuple) or
                  type(center).__name__ == "MultiValue" else center)
        w = float(width[0] if isinstance(width, list | tuple) or
                  type(width).__name__ == "MultiValue" else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w >= 1 else None


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    sample = values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)]
    lo, hi = (float(x) for x in np.percentile(sample, [1, 99]))
    return (lo + hi) / 2, max(1.0, hi - lo)
