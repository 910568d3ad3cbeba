"""What travels between the node and a remote worker: a volume out, a label map back.

One small streamed binary format for both directions::

    MAGIC (8 bytes "DNWIRE1\\n")
    u32 big-endian header length, header (JSON, UTF-8)
    one frame per slice: u32 length, payload (the slice's C-order bytes, raw or zlib)
    end: u32 0, SHA-256 of every slice's raw bytes (32 bytes)

The header says the format, the job, the array's shape, dtype (little-endian on the wire)
and codec. The volume's
header carries **only** what a model needs and nothing that identifies the patient: the
geometry (origin, directions, spacing, slice positions, affine), the modality and SOP
class, per-slice *opaque keys* (HMAC of the job and the SOP Instance UID, meaningless
outside the node), a few whitelisted facts about the stack, and the header attributes the
model's manifest declares (checked by :mod:`dicomnode.core.phi`). Never names, IDs,
dates, accession numbers or UIDs. The label map's header carries the prediction's
measurements and the model's identity.

Voxels go as int16 when that is lossless (CT in Hounsfield units is), else float32; label
maps as uint8. Decoding is incremental (:class:`Decoder`), bounded by the sizes the header
announces and by a caller's limit, and refuses anything that does not add up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from dicomnode.errors import DicomNodeError
from dicomnode.inference.geometry import Volume

MAGIC = b"DNWIRE1\n"
VOLUME_FORMAT = "dicomnode-volume/1"
LABELS_FORMAT = "dicomnode-labels/1"
CONTENT_TYPE = "application/vnd.dicomnode.wire"
MAX_HEADER_BYTES = 16 << 20
MAX_SLICES = 20000
MAX_SIDE = 8192
CODECS = ("raw", "deflate")
VOLUME_DTYPES = ("int16", "float32")
LABELS_DTYPE = "uint8"
#: Facts about the stack a model may use (from ``Volume.metadata``); nothing else goes.
SHARED_METADATA = ("photometric_interpretation", "uneven_spacing", "slice_steps",
                   "gantry_tilt_deg", "stack_direction", "mosaic", "image_positions")

Codec = Literal["raw", "deflate"]


class WireError(DicomNodeError, ValueError):
    """A stream or header that is not what the format (or the job) says it must be."""


# -- opaque slice keys ----------------------------------------------------------------


def slice_key(secret: bytes, job_key: str, sop_instance_uid: str) -> str:
    """The opaque key of one source slice for one job (the same for every fetch of the job,
    unlinkable across jobs and meaningless without the node's secret)."""
    mac = hmac.new(secret, f"{job_key}\x1f{sop_instance_uid}".encode(), hashlib.sha256)
    return "s" + mac.hexdigest()[:24]


# -- encoding ----------------------------------------------------------------------------


def _frames(slices: Iterable[np.ndarray], codec: Codec) -> Iterator[bytes]:
    digest = hashlib.sha256()
    for s in slices:
        raw = np.ascontiguousarray(s, dtype=s.dtype.newbyteorder("<")).tobytes()
        digest.update(raw)
        payload = zlib.compress(raw, 1) if codec == "deflate" else raw
        yield struct.pack(">I", len(payload))
        yield payload
    yield struct.pack(">I", 0) + digest.digest()


def encode(header: Mapping[str, Any], array: np.ndarray, codec: Codec = "raw") -> Iterator[bytes]:
    """The stream of ``array`` (slice by slice along axis 0) under ``header``.

    ``shape``, ``dtype`` and ``codec`` are set in the header from the array.
    """
    if codec not in CODECS:
        raise ValueError(f"codec: must be one of {CODECS}, not {codec!r}")
    if array.ndim != 3:
        raise ValueError(f"array: must be 3-D (slices, rows, columns), not {array.ndim}-D")
    head = dict(header)
    head.update(shape=[int(n) for n in array.shape], dtype=str(array.dtype), codec=codec)
    body = json.dumps(head, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"header: {len(body)} bytes, at most {MAX_HEADER_BYTES}")
    yield MAGIC + struct.pack(">I", len(body)) + body
    yield from _frames((array[k] for k in range(array.shape[0])), codec)


# -- decoding ----------------------------------------------------------------------------


class Decoder:
    """Incremental decoder: :meth:`feed` chunks as they arrive, then :meth:`finish`.

    ``expect``: the header's ``format``. ``dtypes``: the dtypes accepted. ``max_bytes``: the
    largest decoded array accepted (checked against the header before anything is
    allocated). ``as_dtype``: the dtype of the array made (default: the header's).
    """

    def __init__(self, expect: str, dtypes: Sequence[str], max_bytes: int,
                 as_dtype: str | None = None) -> None:
        self.expect = expect
        self.as_dtype = as_dtype  # e.g. float32: converted slice by slice while decoding
        self.dtypes = tuple(dtypes)
        self.max_bytes = int(max_bytes)
        self.header: dict[str, Any] | None = None
        self.array: np.ndarray | None = None
        self._buf = bytearray()
        self._k = 0
        self._digest = hashlib.sha256()
        self._done = False
        self._slice_bytes = 0
        self._pos = 0

    def feed(self, chunk: bytes) -> None:
        if self._done:
            if chunk:
                raise WireError("data after the end of the stream")
            return
        self._buf += chunk
        try:
            while self._step():
                pass
        finally:
            del self._buf[: self._pos]  # one move per chunk, not one per frame
            self._pos = 0

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _step(self) -> bool:
        buf, pos = self._buf, self._pos
        if self.header is None:
            start = pos + len(MAGIC) + 4
            if len(buf) < start:
                return False
            if bytes(buf[pos : pos + len(MAGIC)]) != MAGIC:
                raise WireError("not a dicomnode wire stream (bad magic)")
            (n,) = struct.unpack(">I", buf[start - 4 : start])
            if n > MAX_HEADER_BYTES:
                raise WireError(f"header of {n} bytes is too large")
            if len(buf) < start + n:
                return False
            try:
                header = json.loads(bytes(buf[start : start + n]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise WireError(f"header is not JSON: {exc}") from None
            self._pos = start + n
            self._start(header)
            return True
        if self._avail() < 4:
            return False
        (n,) = struct.unpack(">I", buf[pos : pos + 4])
        assert self.array is not None
        if n == 0:  # end marker + digest
            if self._avail() < 4 + 32:
                return False
            if self._k != self.array.shape[0]:
                raise WireError(f"stream ended after {self._k} of {self.array.shape[0]} slices")
            if not hmac.compare_digest(bytes(buf[pos + 4 : pos + 36]), self._digest.digest()):
                raise WireError("checksum mismatch: the data was damaged in transit")
            if self._avail() > 36:
                raise WireError("data after the end of the stream")
            self._pos = pos + 36
            self._done = True
            return False
        limit = self._slice_bytes if self.header["codec"] == "raw" else \
            self._slice_bytes + self._slice_bytes // 1000 + 1024
        if n > limit:
            raise WireError(f"slice {self._k}: frame of {n} bytes, at most {limit} expected")
        if self._k >= self.array.shape[0]:
            raise WireError("more slices than the header announced")
        if self._avail() < 4 + n:
            return False
        with memoryview(buf) as view:
            payload = view[pos + 4 : pos + 4 + n]
            try:
                if self.header["codec"] == "deflate":
                    d = zlib.decompressobj()
                    try:
                        raw: bytes | memoryview = d.decompress(payload, self._slice_bytes)
                    except zlib.error as exc:
                        raise WireError(f"slice {self._k}: not valid deflate data ({exc})"
                                        ) from None
                    if not d.eof or d.unconsumed_tail:
                        raise WireError(f"slice {self._k}: does not decompress to one slice")
                else:
                    raw = payload
                if len(raw) != self._slice_bytes:
                    raise WireError(f"slice {self._k}: {len(raw)} bytes, {self._slice_bytes}"
                                    " expected")
                self._digest.update(raw)
                self.array[self._k] = np.frombuffer(
                    raw, dtype=self._wire_dtype).reshape(self.array.shape[1:])
            finally:
                payload.release()
        self._pos = pos + 4 + n
        self._k += 1
        return True

    def _start(self, header: object) -> None:
        if not isinstance(header, dict):
            raise WireError("header must be a JSON object")
        if header.get("format") != self.expect:
            raise WireError(f"format {header.get('format')!r}, {self.expect!r} expected")
        shape = header.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
                or not 1 <= shape[0] <= MAX_SLICES
                or not all(1 <= n <= MAX_SIDE for n in shape[1:])):
            raise WireError(f"shape: {shape!r} is not (slices, rows, columns) within limits")
        dtype = header.get("dtype")
        if dtype not in self.dtypes:
            raise WireError(f"dtype: {dtype!r} is not one of {self.dtypes}")
        if header.get("codec") not in CODECS:
            raise WireError(f"codec: {header.get('codec')!r} is not one of {CODECS}")
        itemsize = np.dtype(dtype).itemsize
        total = math.prod(shape) * itemsize
        if total > self.max_bytes:
            raise WireError(f"an array of {total} bytes is larger than the {self.max_bytes}"
                            " accepted")
        self._slice_bytes = shape[1] * shape[2] * itemsize
        if self.as_dtype is not None:
            total = max(total, math.prod(shape) * np.dtype(self.as_dtype).itemsize)
            if total > self.max_bytes:
                raise WireError(f"an array of {total} bytes is larger than the"
                                f" {self.max_bytes} accepted")
        self.header = header
        self._wire_dtype = np.dtype(dtype).newbyteorder("<")
        self.array = np.empty(shape, dtype=np.dtype(self.as_dtype or dtype))

    def finish(self) -> tuple[dict[str, Any], np.ndarray]:
        """The header and the array; raises :class:`WireError` if the stream is incomplete."""
        if not self._done or self.header is None or self.array is None:
            raise WireError("the stream ended early (incomplete transfer)")
        return self.header, self.array


def decode(chunks: Iterable[bytes], expect: str, dtypes: Sequence[str],
           max_bytes: int) -> tuple[dict[str, Any], np.ndarray]:
    """Decode a whole stream (see :class:`Decoder`)."""
    decoder = Decoder(expect, dtypes, max_bytes)
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


# -- volumes ------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def volume_array(volume: Volume) -> np.ndarray:
    """The voxels as they travel: int16 when that is exact (CT in HU), else float32."""
    array = volume.array
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    out = np.empty(array.shape, dtype=np.int16)
    with np.errstate(invalid="ignore"):  # NaN/inf: not int16, caught by the comparison
        for k in range(array.shape[0]):  # slice by slice: in cache, no big temporaries
            out[k] = array[k]  # out-of-range values wrap, and then differ below
            if not np.array_equal(out[k], array[k]):
                return array
    return out


def volume_header(volume: Volume, *, job_id: int, model: str, slice_keys: Sequence[str],
                  attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The PHI-free header of ``volume`` for a remote worker (shape etc. added by
    :func:`encode`)."""
    if len(slice_keys) != volume.array.shape[0]:
        raise ValueError("slice_keys: one key per slice is needed")
    return {
        "format": VOLUME_FORMAT,
        "job": int(job_id),
        "model": model,
        "origin": _jsonable(volume.origin),
        "row_direction": _jsonable(volume.row_direction),
        "col_direction": _jsonable(volume.col_direction),
        "slice_direction": _jsonable(volume.slice_direction),
        "spacing": [float(s) for s in volume.spacing],
        "slice_positions": _jsonable(volume.slice_positions),
        "affine": _jsonable(volume.affine),
        "slice_keys": list(slice_keys),
        "modality": volume.modality,
        "sop_class_uid": volume.sop_class_uid,  # a standard class (e.g. CT Image Storage)
        "metadata": {k: _jsonable(volume.metadata[k]) for k in SHARED_METADATA
                     if k in volume.metadata},
        "attributes": {k: _jsonable(v) for k, v in attributes.items()},
    }


def _vector(header: Mapping[str, Any], name: str, n: int | None = None) -> np.ndarray:
    value = header.get(name)
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise WireError(f"{name}: not a list of numbers") from None
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n) or not np.all(np.isfinite(arr)):
        raise WireError(f"{name}: {n or 'a list of'} finite numbers expected")
    return arr


def volume_from(header: Mapping[str, Any], array: np.ndarray) -> Volume:
    """A worker's :class:`Volume` of a decoded stream: float32 voxels, the geometry, opaque
    slice keys as ``sop_instance_uids`` and no study, series or frame of reference UIDs."""
    k = array.shape[0]
    keys = header.get("slice_keys")
    if not isinstance(keys, list) or len(keys) != k or not all(isinstance(x, str) for x in keys):
        raise WireError("slice_keys: one string per slice expected")
    spacing = _vector(header, "spacing", 3)
    metadata = dict(header.get("metadata") or {})
    for name in ("image_positions", "stack_direction", "slice_steps"):
        if name in metadata:
            metadata[name] = np.asarray(metadata[name], dtype=float)
    metadata["attributes"] = dict(header.get("attributes") or {})
    return Volume(
        array=array.astype(np.float32, copy=False),
        origin=_vector(header, "origin", 3),
        row_direction=_vector(header, "row_direction", 3),
        col_direction=_vector(header, "col_direction", 3),
        slice_direction=_vector(header, "slice_direction", 3),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        slice_positions=_vector(header, "slice_positions", k),
        sop_instance_uids=tuple(keys),
        study_uid="",
        series_uid="",
        frame_of_reference_uid="",
        modality=str(header.get("modality", "")),
        sop_class_uid=str(header.get("sop_class_uid", "")),
        metadata=metadata,
    )


# -- label maps -----------------------------------------------------------------------------


def labels_header(*, job_id: int, model: str, model_version: str, device: str,
                  seconds: float, slice_keys: Sequence[str],
                  measurements: Mapping[str, Mapping[str, tuple[float, str]]],
                  worker: str) -> dict[str, Any]:
    """The header of a label map handed back to the node."""
    return {
        "format": LABELS_FORMAT,
        "job": int(job_id),
        "model": model,
        "model_version": model_version,
        "device": device,
        "seconds": float(seconds),
        "slice_keys": list(slice_keys),
        "measurements": {name: {q: [float(v[0]), str(v[1])] for q, v in quantities.items()}
                         for name, quantities in measurements.items()},
        "worker": worker,
    }
