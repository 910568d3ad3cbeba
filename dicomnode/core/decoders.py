"""Pixel data decoders: which permissively licensed package decodes which transfer syntax.

pydicom 3 decodes encapsulated Pixel Data (PS3.5 A.4) through decoder plugins that it
finds installed, trying them in its own order until one succeeds. The node depends
only on permissively licensed ones (the GPL-3.0 ``pylibjpeg-libjpeg`` is not used):

==========================================  ======================  =========================================
transfer syntax                             UID                     decoded by (first that is installed wins)
==========================================  ======================  =========================================
Implicit / Explicit VR Little Endian        1.2.840.10008.1.2(.1)   pydicom (no plugin)
Explicit VR Big Endian (retired)            1.2.840.10008.1.2.2     pydicom (no plugin)
Deflated Explicit VR Little Endian          1.2.840.10008.1.2.1.99  pydicom + zlib (no plugin)
JPEG Baseline, Process 1                    1.2.840.10008.1.2.4.50  python-gdcm, Pillow
JPEG Extended, Process 2 & 4 (8-bit)        1.2.840.10008.1.2.4.51  python-gdcm, Pillow
JPEG Extended, Process 2 & 4 (12-bit)       1.2.840.10008.1.2.4.51  imagecodecs (libjpeg-turbo), this module
JPEG Lossless, Process 14                   1.2.840.10008.1.2.4.57  python-gdcm
JPEG Lossless, Process 14 SV1               1.2.840.10008.1.2.4.70  python-gdcm
JPEG-LS Lossless / Near-Lossless            1.2.840.10008.1.2.4.80  python-gdcm, pyjpegls (CharLS)
                                            1.2.840.10008.1.2.4.81
JPEG 2000 Lossless / lossy                  1.2.840.10008.1.2.4.90  python-gdcm, pylibjpeg-openjpeg, Pillow
                                            1.2.840.10008.1.2.4.91
RLE Lossless                                1.2.840.10008.1.2.5     pylibjpeg-rle, pydicom
==========================================  ======================  =========================================

Licences (PyPI metadata): python-gdcm Apache-2.0 (GDCM itself BSD), imagecodecs
BSD-3-Clause, pylibjpeg / pylibjpeg-openjpeg / pylibjpeg-rle / pyjpegls MIT, Pillow
MIT-CMU, pydicom MIT.

pydicom's GDCM and Pillow plugins refuse 12-bit JPEG Extended, so :func:`register` adds
one plugin for it: libjpeg-turbo 3 (bundled in imagecodecs) decodes 8- and 12-bit
sequential DCT JPEG exactly as DCMTK's IJG-based ``dcmdjpeg`` does. A stream whose
start-of-scan parameters are not those of sequential DCT (ITU-T T.81 B.2.3: Ss = 0,
Se = 63, Ah = Al = 0) is refused rather than decoded leniently: libjpeg-turbo would
repair it with a warning, which is not a guess to make on images a model measures.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from typing import TYPE_CHECKING

from pydicom import uid

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

logger = logging.getLogger(__name__)

PLUGIN_LABEL = "imagecodecs"

# What the table above says, for code and tests: transfer syntax -> the distributions
# (PyPI names) that decode it, in pydicom's order; "pydicom" is pydicom itself.
DECODERS: dict[str, tuple[str, ...]] = {
    uid.ImplicitVRLittleEndian: ("pydicom",),
    uid.ExplicitVRLittleEndian: ("pydicom",),
    uid.ExplicitVRBigEndian: ("pydicom",),
    uid.DeflatedExplicitVRLittleEndian: ("pydicom",),
    uid.JPEGBaseline8Bit: ("python-gdcm", "pillow"),
    uid.JPEGExtended12Bit: ("python-gdcm", "pillow", "imagecodecs"),
    uid.JPEGLossless: ("python-gdcm",),
    uid.JPEGLosslessSV1: ("python-gdcm",),
    uid.JPEGLSLossless: ("python-gdcm", "pyjpegls"),
    uid.JPEGLSNearLossless: ("python-gdcm", "pyjpegls"),
    uid.JPEG2000Lossless: ("python-gdcm", "pylibjpeg-openjpeg", "pillow"),
    uid.JPEG2000: ("python-gdcm", "pylibjpeg-openjpeg", "pillow"),
    uid.RLELossless: ("pylibjpeg-rle", "pydicom"),
}

# pydicom plugin label -> the distribution that provides it, per transfer syntax
# where one label covers several back-ends (pylibjpeg: openjpeg, rle, libjpeg).
_PLUGIN_DISTRIBUTION: dict[str, str] = {
    "gdcm": "python-gdcm",
    "pillow": "pillow",
    "pyjpegls": "pyjpegls",
    "pydicom": "pydicom",
    PLUGIN_LABEL: "imagecodecs",
}
_PYLIBJPEG_BACKEND: dict[str, str] = {
    uid.JPEG2000Lossless: "pylibjpeg-openjpeg",
    uid.JPEG2000: "pylibjpeg-openjpeg",
    uid.RLELossless: "pylibjpeg-rle",
}

# pydicom's plugin interface (pydicom.pixels.decoders, "decoder plugins")
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs>=2024.9",)}

_lock = threading.Lock()
_registered = False


def is_available(transfer_syntax: str) -> bool:
    """pydicom plugin interface: True if this plugin can decode ``transfer_syntax``."""
    if transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    if importlib.util.find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    return bool(imagecodecs.JPEG8.available)


def register() -> None:
    """Add the 12-bit JPEG Extended plugin to pydicom's decoder (once; thread-safe).

    Cheap and idempotent: call it before decoding. pydicom keeps its own plugins
    first, so this one is tried only where they refuse (12-bit samples)."""
    global _registered
    if _registered:
        return
    from pydicom.pixels import get_decoder

    with _lock:
        if _registered:
            return
        try:
            get_decoder(uid.JPEGExtended12Bit).add_plugin(PLUGIN_LABEL, (__name__, "_decode_frame"))
        except ValueError:  # already added (e.g. by another import path of this module)
            pass
        _registered = True


def available(transfer_syntax: str) -> list[str]:
    """The distributions that can decode ``transfer_syntax`` here, in pydicom's order."""
    from pydicom.pixels import get_decoder

    register()
    ts = uid.UID(transfer_syntax)
    if not ts.is_encapsulated:
        return ["pydicom"]
    out = []
    for label in get_decoder(ts).available_plugins:
        if label == "pylibjpeg":
            out.append(_PYLIBJPEG_BACKEND.get(ts, "pylibjpeg-libjpeg"))
        else:
            out.append(_PLUGIN_DISTRIBUTION.get(label, label))
    return out


def check_scan_header(src: bytes, rows: int | None = None, columns: int | None = None) -> None:
    """Refuse a JPEG stream that is not sequential DCT with a conforming first scan.

    Walks the marker segments (ITU-T T.81 B.1.1) up to the first SOS: the frame must be
    SOF0 or SOF1 (baseline / extended sequential, DICOM PS3.5 A.4.1 Process 1, 2 and
    4) with a precision of 8 or 12 bits and, where given, the dataset's ``rows`` and
    ``columns`` (checked before decoding, so that a hostile frame header cannot make
    the decoder allocate an image the dataset does not describe); the scan header must
    have Ss = 0, Se = 63, Ah = Al = 0 (T.81 B.2.3)."""
    if src[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream: no SOI marker (ITU-T T.81 B.2.1)")
    pos, frame_marker = 2, None
    while True:
        while pos < len(src) and src[pos] == 0xFF and pos + 1 < len(src) and src[pos + 1] == 0xFF:
            pos += 1  # fill bytes (T.81 B.1.1.2)
        if pos + 4 > len(src) or src[pos] != 0xFF:
            raise ValueError("JPEG stream ends or is corrupt before its first scan (no SOS marker)")
        marker = src[pos + 1]
        length = int.from_bytes(src[pos + 2 : pos + 4], "big")
        if length < 2:
            raise ValueError(f"JPEG marker segment 0xFF{marker:02X} has an impossible length {length}")
        if pos + 2 + length > len(src):
            raise ValueError(f"JPEG stream ends inside marker segment 0xFF{marker:02X}, before its "
                             "first scan")
        body = src[pos + 4 : pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame_marker = marker
            if len(body) < 6:
                raise ValueError("JPEG frame header (SOF) is truncated")
            precision = body[0]
            lines, samples = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            if precision not in (8, 12):
                raise ValueError(f"JPEG frame precision {precision} bits: sequential DCT has 8 or "
                                 "12 (ITU-T T.81 B.2.2)")
            if (rows, columns) != (None, None) and (lines, samples) != (rows, columns):
                raise ValueError(f"JPEG frame is {lines} x {samples}, the dataset says "
                                 f"{rows} x {columns}")
        elif marker == 0xDA:  # SOS
            if frame_marker not in (0xC0, 0xC1):
                found = "none" if frame_marker is None else f"SOF{frame_marker - 0xC0}"
                raise ValueError(f"JPEG frame is {found}, not sequential DCT (SOF0/SOF1) as "
                                 "JPEG Baseline/Extended requires (PS3.5 A.4.1)")
            ns = body[0] if body else 0
            tail = body[1 + 2 * ns : 4 + 2 * ns]
            if len(tail) != 3:
                raise ValueError("JPEG scan header (SOS) is truncated")
            ss, se, ahl = tail
            if (ss, se, ahl) != (0, 63, 0):
                raise ValueError(
                    f"invalid SOS parameters for sequential JPEG (Ss={ss}, Se={se}, Ah={ahl >> 4}, "
                    f"Al={ahl & 15}; ITU-T T.81 B.2.3 requires 0, 63, 0, 0)")
            return
        pos += 2 + length


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom plugin interface: one JPEG Extended frame -> its samples as bytes."""
    import imagecodecs
    import numpy as np

    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the imagecodecs JPEG plugin decodes grayscale (1 sample) only")
    check_scan_header(src, runner.rows, runner.columns)
    arr = imagecodecs.jpeg8_decode(src)
    if arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded JPEG frame has shape {arr.shape}, the dataset says "
                         f"{(runner.rows, runner.columns)}")
    container = runner.bits_allocated // 8
    if container < arr.dtype.itemsize:
        raise ValueError(f"{8 * arr.dtype.itemsize}-bit JPEG samples do not fit Bits Allocated "
                         f"{runner.bits_allocated}")
    return bytes(np.ascontiguousarray(arr, dtype=f"<u{container}").tobytes())
