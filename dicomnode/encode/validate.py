"""Check an encoded object before it leaves: write it, read it back, run dciodvfy.

``check_object(ds_or_path)`` returns a list of problems (empty = fine):

1. the object is written as a DICOM Part 10 file (PS3.10) to a temporary file
   (a path is checked as it is);
2. it is read back with pydicom and, by SOP class, parsed by highdicom
   (``highdicom.seg.segread`` for Segmentation, ``highdicom.sr.srread`` for SR),
   the way a consumer would;
3. dciodvfy (dicom3tools, David Clunie) checks it against the IOD (PS3.3) and its
   ``Error`` lines are returned. Warnings are not errors and are not returned.
   Where dciodvfy is not installed this step is skipped (logged once).

``ensure_valid(ds)`` raises :class:`EncodingError` listing every problem. The
export stage calls it on every object before it is sent.

Problems name the attribute and what is wrong with it, never its value: dciodvfy and
pydicom quote values (a patient's name, say), and these lines go into logs and the
job database's ``last_error``; :func:`dicomnode.core.redact.redact_values` replaces each
quoted value by ``…``.

No dciodvfy error is ignored at present: the SEG and SR written by
:mod:`dicomnode.encode.seg` and :mod:`dicomnode.encode.sr` pass it clean. Should a
benign one have to be ignored, it goes into ``IGNORED_DCIODVFY`` with its reason.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomnode.core.redact import describe_exception, redact_values
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
#: SR Storage SOP classes that ``highdicom.sr.srread`` reads (PS3.4 B.5).
SR_STORAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
})

#: dciodvfy error lines (regular expressions) known to be benign, each with its reason.
IGNORED_DCIODVFY: tuple[tuple[str, str], ...] = ()

DCIODVFY_TIMEOUT_S = 300.0


class EncodingError(DicomNodeError):
    """An encoded object is not valid DICOM, or a result cannot be encoded.

    ``problems`` lists every problem found, one line each.
    """

    def __init__(self, problems: list[str], what: str = "encoded object") -> None:
        self.problems = list(problems)
        lines = [f"{what} is not valid:"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def check_object(ds_or_path: Dataset | str | os.PathLike[str]) -> list[str]:
    """Every problem found in ``ds_or_path`` (a dataset or a Part 10 file); empty if none."""
    if isinstance(ds_or_path, Dataset):
        with tempfile.TemporaryDirectory(prefix="dicomnode-validate-") as tmp:
            path = Path(tmp) / "object.dcm"
            try:
                ds_or_path.save_as(path, enforce_file_format=True)
            except Exception as exc:  # noqa: BLE001 - any failure to write is the finding
                return [f"pydicom: cannot write the dataset: {describe_exception(exc)}"]
            return _check_file(path)
    return _check_file(Path(ds_or_path))


def ensure_valid(ds_or_path: Dataset | str | os.PathLike[str]) -> None:
    """Raise :class:`EncodingError` if ``check_object`` finds any problem."""
    problems = check_object(ds_or_path)
    if problems:
        what = "encoded object"
        if isinstance(ds_or_path, Dataset):
            what = f"{_sop_class_name(str(ds_or_path.get('SOPClassUID', '')))} {ds_or_path.get('SOPInstanceUID', '')}"
        raise EncodingError(problems, what=what)


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def _check_file(path: Path) -> list[str]:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return [f"pydicom: cannot read back: {describe_exception(exc)}"]
    proc = _start_dciodvfy(path)  # runs in its own process while we read the file back
    problems = _read_back(path, str(header.get("SOPClassUID", "")))
    return problems + _dciodvfy_result(proc, path)


def _read_back(path: Path, sop_class: str) -> list[str]:
    """Parse the file the way a consumer would (highdicom for SEG and SR)."""
    import highdicom as hd

    try:
        if sop_class in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
            # structure and segment tables parse; frames are not decoded (dciodvfy checks
            # the pixel module, and the tests check frames pixel by pixel)
            seg = hd.seg.segread(path, lazy_frame_retrieval=True)
            if seg.number_of_segments < 1:
                return ["highdicom: the segmentation has no segments"]
        elif sop_class in SR_STORAGE:
            sr = hd.sr.srread(path)
            templates = sr.get("ContentTemplateSequence", [])
            if any(str(t.get("TemplateIdentifier", "")) == "1500" for t in templates):
                # TID 1500 Measurement Report: its groups and measurements must parse
                report = hd.sr.MeasurementReport.from_sequence([sr], copy=False)
                report.get_volumetric_roi_measurement_groups()
                report.get_observer_contexts()
        else:
            ds = pydicom.dcmread(path)
            if "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - decoding is the check
    except Exception as exc:  # noqa: BLE001
        return [f"highdicom: cannot read back: {describe_exception(exc)}"]
    return []


_ERROR_LINE = re.compile(r"^\s*(Error|Abort)\b")
_warned_missing = False


def _start_dciodvfy(path: Path) -> subprocess.Popen[str] | None:
    global _warned_missing
    exe = shutil.which("dciodvfy")
    if exe is None:
        if not _warned_missing:
            logger.warning("dciodvfy is not installed: IOD checks skipped")
            _warned_missing = True
        return None
    return subprocess.Popen([exe, "-filename", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")


def _dciodvfy(path: Path) -> list[str]:
    return _dciodvfy_result(_start_dciodvfy(path), path)


def _dciodvfy_result(proc: subprocess.Popen[str] | None, path: Path) -> list[str]:
    if proc is None:
        return []
    try:
        stdout, stderr = proc.communicate(timeout=DCIODVFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [f"dciodvfy: no answer within {DCIODVFY_TIMEOUT_S:g} s"]
    out: list[str] = []
    for line in (stdout + "\n" + stderr).splitlines():
        line = line.strip()
        # with -filename, lines are prefixed "path: "
        if line.startswith(str(path)):
            line = line[len(str(path)):].lstrip(": ").strip()
        if not _ERROR_LINE.match(line):
            continue
        if any(re.search(pattern, line) for pattern, _why in IGNORED_DCIODVFY):
            continue
        out.append(f"dciodvfy: {redact_values(line)}")
    return out


def _sop_class_name(uid: str) -> str:
    try:
        return pydicom.uid.UID(uid).name or uid
    except Exception:  # noqa: BLE001
        return uid
