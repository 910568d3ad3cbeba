"""Every transfer syntax decodes with permissively licensed decoders only.

The table in dicomnode/decoders.py says which package decodes which syntax; these
tests check that it is true here: each syntax has an installed decoder, every decoder
it names is permissively licensed by its own PyPI metadata, and real images encoded by
DCMTK in each syntax decode to the same values as DCMTK's own decoder gives (lossy
syntaxes) or as the uncompressed original (lossless ones). The NEMA and dcm_qa_ts
samples in tests/test_volume.py cover JPEG 2000, JPEG-LS and RLE from other encoders.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import need_tool, shared
from pydicom import uid
from pydicom.encaps import generate_frames

from dicomnode.core import decoders
from dicomnode.errors import InvalidInstanceError
from dicomnode.inference.volume import load_series

NEMA = "nema-wg04-compression-samples"
PERMISSIVE = ("MIT", "BSD", "Apache", "HPND", "ISC", "PSF", "zlib")


def _licence(dist: str) -> str:
    """What the distribution's own metadata says: License-Expression, the first line of
    License, and the License classifiers."""
    meta = importlib.metadata.metadata(dist)
    expression = (meta.get_all("License-Expression") or [""])[0]
    first_line = ((meta.get_all("License") or [""])[0].splitlines() or [""])[0]
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " | ".join([f"{expression} {first_line}".strip(), *classifiers])


def test_every_transfer_syntax_has_a_decoder() -> None:
    for ts, named in decoders.DECODERS.items():
        found = decoders.available(ts)
        assert found, f"{uid.UID(ts).name}: no decoder installed"
        assert named[0] in found, f"{uid.UID(ts).name}: {named[0]} (first in the table) is not installed"
        assert set(found) - {"pylibjpeg-libjpeg"}, f"{uid.UID(ts).name} needs the GPL decoder"


@pytest.mark.parametrize("dist", sorted({d for names in decoders.DECODERS.values() for d in names}))
def test_every_decoder_is_permissively_licensed(dist: str) -> None:
    licence = _licence(dist)
    assert "GPL" not in licence.replace("LGPL", ""), f"{dist}: {licence}"
    assert any(word in licence for word in PERMISSIVE), f"{dist}: licence not recognised: {licence}"


# -- real images, encoded by DCMTK, decoded here ---------------------------------------

# name -> (DCMTK tool and options, transfer syntax written, lossless)
ENCODINGS: dict[str, tuple[list[str], str, bool]] = {
    "jpeg-baseline": (["dcmcjpeg", "+eb"], uid.JPEGBaseline8Bit, False),
    "jpeg-extended-12bit": (["dcmcjpeg", "+ee"], uid.JPEGExtended12Bit, False),
    "jpeg-lossless-p14": (["dcmcjpeg", "+el"], uid.JPEGLossless, True),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], uid.JPEGLosslessSV1, True),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], uid.JPEGLSLossless, True),
    "jpeg-ls-near": (["dcmcjpls", "+en"], uid.JPEGLSNearLossless, False),
    "rle": (["dcmcrle"], uid.RLELossless, True),
    "big-endian": (["dcmconv", "+tb"], uid.ExplicitVRBigEndian, True),
    "deflate": (["dcmconv", "+td"], uid.DeflatedExplicitVRLittleEndian, True),
}
DCMTK_DECODER = {"dcmcjpeg": "dcmdjpeg", "dcmcjpls": "dcmdjpls"}


def _dcmtk(cmd: list[str], src: Path, dst: Path) -> Path:
    need_tool(cmd[0])
    out = subprocess.run([*cmd, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr}"
    return dst


@pytest.mark.parametrize("image", ["MR4", "CT1"])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_dcmtk_encoded_image_decodes(name: str, image: str, tmp_path: Path) -> None:
    """MR4: 12 bits stored, unsigned; CT1: 16 bits stored, signed (12-bit JPEG can't hold it)."""
    cmd, ts, lossless = ENCODINGS[name]
    ref_path = shared(NEMA, "REF", f"{image}_UNC.dcm")
    if image == "CT1" and name in ("jpeg-baseline", "jpeg-extended-12bit"):
        pytest.skip("lossy JPEG holds 8 or 12 bits; CT1 stores 16")
    if image == "CT1" and name == "jpeg-ls-near":
        pytest.skip("DCMTK's near-lossless JPEG-LS encoder refuses signed pixels (CT1 is signed)")
    encoded = _dcmtk(cmd, ref_path, tmp_path / f"{name}.dcm")
    assert pydicom.dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    vol = load_series([encoded], workers=1)
    if lossless:
        oracle = load_series([ref_path])
    else:  # DCMTK's own decoder (IJG libjpeg / CharLS) is the oracle for lossy streams
        oracle = load_series([_dcmtk([DCMTK_DECODER[cmd[0]]], encoded, tmp_path / "dec.dcm")])
    np.testing.assert_array_equal(vol.array, oracle.array)
    if not lossless:  # and it is still the image
        original = load_series([ref_path]).array.ravel()
        assert np.corrcoef(vol.array.ravel(), original)[0, 1] > 0.99


def test_real_12bit_jpeg_extended_matches_dcmtk(tmp_path: Path) -> None:
    """pydicom's 12-bit JPEG Extended sample, decoded as DCMTK's dcmdjpeg decodes it."""
    src = shared("pydicom-test-files", "transfer-syntaxes", "JPGExtended.dcm")
    decoders.register()
    ds = pydicom.dcmread(src)
    assert (ds.file_meta.TransferSyntaxUID, ds.BitsStored) == (uid.JPEGExtended12Bit, 12)
    ours = ds.pixel_array
    ref = pydicom.dcmread(_dcmtk(["dcmdjpeg"], src, tmp_path / "dec.dcm")).pixel_array
    np.testing.assert_array_equal(ours, ref)


def _first_frame(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.mark.parametrize("name", ["MR1_JPLY.dcm", "XA1_JPLY.dcm"])
def test_non_sequential_scan_header_refused(name: str) -> None:
    """The NEMA JPLY files put Se=0 in their scan header (T.81 B.2.3 asks 63)."""
    path = shared(NEMA, "JPLY", name)
    with pytest.raises(ValueError, match=r"invalid SOS parameters .*Se=0"):
        decoders.check_scan_header(_first_frame(path))
    decoders.register()
    with pytest.raises(RuntimeError, match=r"imagecodecs: invalid SOS parameters"):
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the test
    if name.startswith("MR1"):  # XA1 has no patient geometry: not a volume anyway
        with pytest.raises(InvalidInstanceError, match="could not be decoded"):
            load_series([path])


def test_progressive_and_broken_streams_refused(tmp_path: Path) -> None:
    progressive = _dcmtk(["dcmcjpeg", "+ep"], shared(NEMA, "REF", "MR4_UNC.dcm"), tmp_path / "p.dcm")
    frame = _first_frame(progressive)
    with pytest.raises(ValueError, match="SOF2, not sequential DCT"):
        decoders.check_scan_header(frame)
    good = _first_frame(_dcmtk(["dcmcjpeg", "+ee"], shared(NEMA, "REF", "MR4_UNC.dcm"),
                               tmp_path / "e.dcm"))
    decoders.check_scan_header(good)
    with pytest.raises(ValueError, match="no SOI"):
        decoders.check_scan_header(b"\x00" + good)
    with pytest.raises(ValueError, match="before its first scan"):
        decoders.check_scan_header(good[:40])
    with pytest.raises(ValueError, match="no SOS marker"):
        decoders.check_scan_header(good[:2])
    with pytest.raises(ValueError, match="impossible length"):
        decoders.check_scan_header(b"\xff\xd8\xff\xc1\x00\x01" + good[6:])
    decoders.check_scan_header(good, 512, 512)
    sof = good.index(b"\xff\xc1")
    huge = good[: sof + 5] + b"\xff\xff\xff\xff" + good[sof + 9 :]  # 65535 x 65535
    with pytest.raises(ValueError, match="frame is 65535 x 65535, the dataset says 512 x 512"):
        decoders.check_scan_header(huge, 512, 512)
    odd = good[: sof + 4] + b"\x10" + good[sof + 5 :]  # 16-bit precision
    with pytest.raises(ValueError, match="precision 16 bits"):
        decoders.check_scan_header(odd)


def test_hostile_frame_size_refused_before_decoding(tmp_path: Path) -> None:
    """A 12-bit JPEG Extended instance whose JPEG frame claims 65535 x 65535 pixels
    is refused with a reason, without allocating that image."""
    src = _dcmtk(["dcmcjpeg", "+ee"], shared(NEMA, "REF", "MR4_UNC.dcm"), tmp_path / "e.dcm")
    ds = pydicom.dcmread(src)
    frame = _first_frame(src)
    sof = frame.index(b"\xff\xc1")
    hostile = frame[: sof + 5] + b"\xff\xff\xff\xff" + frame[sof + 9 :]
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([hostile])
    ds.save_as(tmp_path / "hostile.dcm")
    with pytest.raises(InvalidInstanceError, match=r"(?s)could not be decoded.*65535 x 65535"):
        load_series([tmp_path / "hostile.dcm"])


def test_register_is_idempotent() -> None:
    from pydicom.pixels import get_decoder

    decoders.register()
    decoders.register()
    assert decoders.PLUGIN_LABEL in get_decoder(uid.JPEGExtended12Bit).available_plugins
