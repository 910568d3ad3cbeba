"""Is a re-sent instance the one already held? (same SOP Instance UID, same content)

A SOP Instance UID names one content (PS3.3 C.12.1.1.1; PS3.5 9): senders re-send an
instance after a failed or lost response, and then it is the same instance. Changed
content under a UID the node already holds is either a sender's "correction" in place
or a collision; :mod:`dicomnode.ingest.admission` refuses it instead of answering
Success and dropping it (its docstring says why). This module only compares:

* in the same transfer syntax, the encoded data sets byte for byte (the file meta,
  which carries the sender's own implementation and AE title, does not count);
* in another transfer syntax (the same image re-sent after another negotiation), the
  data sets parsed, every attribute but the pixel data compared: a change of encoding
  alone is not a change of content.
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

LOG = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float / Double Float / Pixel Data


def dataset_offset(path: Path) -> tuple[str, int]:
    """``(transfer syntax, offset of the data set)`` of a Part 10 file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with path.open("rb") as f:
        read_preamble(f, False)
        meta = _read_file_meta_info(f)
        return str(meta.get("TransferSyntaxUID", "")), f.tell()


def same_content(stored: Path, transfer_syntax: str, dataset: memoryview | None = None,
                 file: Path | None = None, offset: int = 0) -> bool:
    """Whether the arriving data set (``dataset`` bytes, or ``file`` from ``offset``) is
    the content of the stored Part 10 file ``stored``. Unreadable: not the same."""
    try:
        held_ts, held_offset = dataset_offset(stored)
        if held_ts == transfer_syntax:
            return _same_bytes(stored, held_offset, dataset, file, offset)
        return _same_attributes(stored, transfer_syntax, dataset, file, offset)
    except Exception as exc:  # noqa: BLE001 - cannot tell: treat as different (refused)
        LOG.warning("cannot compare a re-sent instance with the one held: %s",
                    type(exc).__name__)
        return False


def _same_bytes(stored: Path, held_offset: int, dataset: memoryview | None,
                file: Path | None, offset: int) -> bool:
    held_size = stored.stat().st_size - held_offset
    new_size = dataset.nbytes if dataset is not None else (
        file.stat().st_size - offset if file is not None else -1)
    if held_size != new_size:
        return False
    with stored.open("rb") as held:
        held.seek(held_offset)
        if dataset is not None:
            pos = 0
            while chunk := held.read(_CHUNK):
                if dataset[pos:pos + len(chunk)] != chunk:
                    return False
                pos += len(chunk)
            return True
        assert file is not None
        with file.open("rb") as new:
            new.seek(offset)
            while True:
                a, b = held.read(_CHUNK), new.read(_CHUNK)
                if a != b:
                    return False
                if not a:
                    return True


def _same_attributes(stored: Path, transfer_syntax: str, dataset: memoryview | None,
                     file: Path | None, offset: int) -> bool:
    import pydicom

    held = pydicom.dcmread(stored, stop_before_pixels=True)
    if file is not None:
        with file.open("rb") as f:
            f.seek(offset)
            new = _parse(f, transfer_syntax)
    else:
        assert dataset is not None
        new = _parse(io.BytesIO(dataset), transfer_syntax)
    return _equal(held, new, top=True)


def _parse(fp: BinaryIO, transfer_syntax: str) -> Dataset:
    """A data set without file meta read from ``fp`` in ``transfer_syntax`` (PS3.5 A),
    up to its pixels."""
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    uid = UID(transfer_syntax)
    if uid == DeflatedExplicitVRLittleEndian:
        fp = io.BytesIO(zlib.decompress(fp.read(), -zlib.MAX_WBITS))
    return read_dataset(fp, uid.is_implicit_VR, uid.is_little_endian,
                        stop_when=lambda tag, vr, length: int(tag) in _PIXEL_TAGS)


def _equal(a: Dataset, b: Dataset, *, top: bool = False) -> bool:
    """Same attributes and values; an element read as UN on either side (a private one
    in Implicit VR) cannot be compared by value and is compared by presence only."""
    def tags(ds: Dataset) -> set[int]:
        return {int(t) for t in ds.keys() if t.element != 0 and not (top and int(t) in _PIXEL_TAGS)}

    if tags(a) != tags(b):
        return False
    for tag in tags(a):
        ea, eb = a[tag], b[tag]
        if ea.VR == "SQ" and eb.VR == "SQ":
            if len(ea.value) != len(eb.value) or not all(
                    _equal(x, y) for x, y in zip(ea.value, eb.value, strict=True)):
                return False
        elif "UN" not in (ea.VR, eb.VR) and ea.value != eb.value:
            return False
    return True
