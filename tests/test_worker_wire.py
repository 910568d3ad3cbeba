"""The node <-> worker format (dicomnode/worker/wire.py) and what may travel in it
(dicomnode/inference/phi.py, the manifest's ``attributes``)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_series

from dicomnode.core.manifest import load_manifest
from dicomnode.core.phi import check_shareable
from dicomnode.errors import ConfigError
from dicomnode.inference.volume import load_series
from dicomnode.worker import wire


def _stream(array: np.ndarray, codec: str = "raw", **header: object) -> bytes:
    return b"".join(wire.encode({"format": wire.LABELS_FORMAT, **header}, array, codec))  # type: ignore[arg-type]


def _decode(data: bytes, max_bytes: int = 1 << 24, chunk: int = 7) -> tuple[dict, np.ndarray]:
    return wire.decode([data[i : i + chunk] for i in range(0, len(data), chunk)],
                       wire.LABELS_FORMAT, ("uint8", "int16"), max_bytes)


@pytest.mark.parametrize("codec", ["raw", "deflate"])
def test_round_trip_in_any_chunking(codec: str) -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random((5, 17, 9)) > 0.7).astype(np.uint8) * 2
    header, back = _decode(_stream(labels, codec, job=3))
    assert header["shape"] == [5, 17, 9] and header["dtype"] == "uint8"
    assert header["codec"] == codec and header["job"] == 3
    assert np.array_equal(back, labels)
    hu = rng.integers(-1024, 3000, (3, 4, 5)).astype(np.int16)
    assert np.array_equal(_decode(_stream(hu, codec), chunk=1 << 20)[1], hu)


def test_damaged_or_short_streams_are_refused_with_a_reason() -> None:
    data = _stream(np.ones((4, 8, 8), np.uint8))
    with pytest.raises(wire.WireError, match="ended early"):
        _decode(data[:-40])
    damaged = bytearray(data)
    damaged[-50] ^= 0xFF  # a voxel of the last slice
    with pytest.raises(wire.WireError, match="checksum"):
        _decode(bytes(damaged))
    with pytest.raises(wire.WireError, match="bad magic"):
        _decode(b"GARBAGE!" + data[8:])
    with pytest.raises(wire.WireError, match="after the end"):
        _decode(data + b"x")
    with pytest.raises(wire.WireError, match="format"):
        wire.decode([data], wire.VOLUME_FORMAT, ("uint8",), 1 << 20)
    with pytest.raises(wire.WireError, match="dtype"):
        wire.decode([data], wire.LABELS_FORMAT, ("int16",), 1 << 20)
    with pytest.raises(wire.WireError, match="larger than"):
        _decode(data, max_bytes=100)  # refused from the header, before any allocation


def _handmade(header: dict, frames: list[bytes]) -> bytes:
    body = json.dumps(header).encode()
    out = wire.MAGIC + struct.pack(">I", len(body)) + body
    for f in frames:
        out += struct.pack(">I", len(f)) + f
    return out


def test_hostile_headers_and_frames() -> None:
    ok = {"format": wire.LABELS_FORMAT, "dtype": "uint8", "codec": "deflate"}
    for shape in ([0, 4, 4], [2, 4], [2, 4, 99999], "4x4x4", [True, 4, 4]):
        with pytest.raises(wire.WireError, match="shape"):
            _decode(_handmade({**ok, "shape": shape}, []))
    # a deflate bomb: one frame inflating far beyond one slice is cut at the slice size
    bomb = zlib.compress(b"\0" * (1 << 22))
    with pytest.raises(wire.WireError, match="one slice"):
        _decode(_handmade({**ok, "shape": [1, 64, 64]}, [bomb]))
    with pytest.raises(wire.WireError, match="at most"):  # a frame larger than a slice
        _decode(_handmade({**ok, "codec": "raw", "shape": [1, 8, 8]}, [b"\0" * 65]))
    with pytest.raises(wire.WireError, match="not JSON"):
        _decode(wire.MAGIC + struct.pack(">I", 3) + b"{x}")
    with pytest.raises(wire.WireError, match="too large"):
        _decode(wire.MAGIC + struct.pack(">I", wire.MAX_HEADER_BYTES + 1))


def test_a_volume_travels_with_its_geometry_and_nothing_that_names_the_patient(
        tmp_path: Path) -> None:
    files = make_series(tmp_path, n=6, size=24)
    volume = load_series(files)
    keys = [wire.slice_key(b"k" * 32, "job-key", u) for u in volume.sop_instance_uids]
    assert keys == [wire.slice_key(b"k" * 32, "job-key", u) for u in volume.sop_instance_uids]
    assert wire.slice_key(b"k" * 32, "other-job", volume.sop_instance_uids[0]) != keys[0]
    header = wire.volume_header(volume, job_id=9, model="m", slice_keys=keys,
                                attributes={"KVP": 120.0})
    array = wire.volume_array(volume)
    assert array.dtype == np.int16
    data = b"".join(wire.encode(header, array, "deflate"))
    for uid in (volume.study_uid, volume.series_uid, volume.frame_of_reference_uid,
                *volume.sop_instance_uids):
        assert uid.encode() not in data
    decoded = wire.volume_from(*wire.decode([data], wire.VOLUME_FORMAT, wire.VOLUME_DTYPES,
                                            1 << 24))
    assert np.array_equal(decoded.array, volume.array) and decoded.array.dtype == np.float32
    assert np.allclose(decoded.affine, volume.affine)
    assert np.allclose(decoded.slice_positions, volume.slice_positions)
    assert decoded.spacing == pytest.approx(volume.spacing)
    assert decoded.sop_instance_uids == tuple(keys)
    assert decoded.metadata["attributes"] == {"KVP": 120.0}
    assert decoded.metadata["photometric_interpretation"] == "MONOCHROME2"
    assert "instance_numbers" not in decoded.metadata and "transfer_syntaxes" not in \
        decoded.metadata
    # float voxels that are not whole numbers stay float32
    soft = load_series(files)
    object.__setattr__(soft, "array", soft.array + 0.5)
    assert wire.volume_array(soft).dtype == np.float32


@pytest.mark.parametrize("keyword", ["PatientName", "PatientID", "PatientBirthDate",
                                     "StudyDate", "AcquisitionDateTime", "AccessionNumber",
                                     "StudyInstanceUID", "InstitutionName", "StationName",
                                     "DeviceSerialNumber", "StudyDescription", "OtherPatientIDs",
                                     "ReferencedImageSequence", "PixelData", "PatientAddress"])
def test_identifying_attributes_never_leave_the_node(keyword: str) -> None:
    with pytest.raises(ValueError, match="never leaves the node"):
        check_shareable(keyword)


def test_manifest_attributes_are_checked_at_load(tmp_path: Path) -> None:
    for keyword in ("KVP", "ConvolutionKernel", "PatientAge", "PatientSex", "BodyPartExamined"):
        assert check_shareable(keyword) == keyword
    with pytest.raises(ValueError, match="not a DICOM attribute"):
        check_shareable("NoSuchThing")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "manifest.yaml").write_text(
        "name: m\nversion: '1'\nruntime: builtin\nentry_point: x.py:X\n"
        "labels: [{value: 1, name: a, category: {value: '1', meaning: c},"
        " type: {value: '2', meaning: t}}]\nattributes: [KVP, PatientName]\n")
    with pytest.raises(ConfigError, match="PatientName"):
        load_manifest(folder)
