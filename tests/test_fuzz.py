"""Bounded atheris fuzzing of the parsers that read untrusted bytes (marked slow).

* ``read_header``: the C-STORE handler's parser of the received dataset, with the
  transfer syntax picked by the first input byte from a small list; seeded with
  real dataset encodings built with pydicom.
* ``validate_uid``: UIDs from the network before they become paths.
* ``MultipartParser`` / ``boundary_from``: the STOW-RS body and Content-Type.

Each target runs in its own process (``atheris.Setup``/``Fuzz`` own the process)
for ``DICOMNODE_FUZZ_SECONDS`` (default 12 s for read_header, a third of it for
the others), with a per-input timeout and an RSS limit. Any exception other than
the documented refusal is a crash; a crash, hang or OOM fails the test and prints
the reproducer path (re-run it with ``python <script> <reproducer>``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("DICOMNODE_FUZZ_SECONDS", "12"))
PER_INPUT_TIMEOUT = 10
RSS_LIMIT_MB = 1024

pytestmark = pytest.mark.slow

SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (pydicom path)
    "1.2.840.10008.1.2.1.99",  # deflated (inflate + pydicom path)
    "1.2.840.10008.1.2.4.50",  # JPEG baseline: encapsulated, header explicit LE
    "1.2.840.10008.1.2.4.90",  # JPEG 2000
    "1.2.3.4",  # not a transfer syntax at all
]

_PRELUDE = """
import logging, os, sys, warnings
sys.path.insert(0, {root!r})
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
import atheris
"""

HEADER_TARGET = """
with atheris.instrument_imports(include=["dicomnode"]):
    from dicomnode.errors import InvalidInstanceError, InvalidUIDError
    from dicomnode.ingest.header import HeaderInfo, read_header

SYNTAXES = {syntaxes!r}

def target(data: bytes) -> None:
    if not data:
        return
    ts = SYNTAXES[data[0] % len(SYNTAXES)]
    try:
        info = read_header(data[1:], ts)
    except (InvalidInstanceError, InvalidUIDError):
        return
    assert isinstance(info, HeaderInfo)
    assert isinstance(info.study_uid, str) and info.study_uid
    assert isinstance(info.series_uid, str) and info.series_uid
    assert info.expected_count is None or info.expected_count > 0
"""

UID_TARGET = """
import re
with atheris.instrument_imports(include=["dicomnode"]):
    from dicomnode.errors import InvalidUIDError
    from dicomnode.core.uids import check_uid as validate_uid

SAFE = re.compile(r"^[0-9]+(\\.[0-9]+)*$")

def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        value = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    elif kind == 1:
        value = fdp.ConsumeBytes(fdp.remaining_bytes()).decode("latin-1")
    elif kind == 2:
        value = fdp.ConsumeBytes(fdp.remaining_bytes())  # not a str: must be refused
    else:
        value = None
    try:
        uid = validate_uid(value, "UID")
    except InvalidUIDError:
        return
    # what passes is safe to use as a file name inside the storage folder
    assert isinstance(uid, str) and 0 < len(uid) <= 64 and SAFE.match(uid), repr(uid)
    assert "/" not in uid and ".." not in uid and uid not in (".", "..")
"""

MULTIPART_TARGET = """
import shutil, tempfile
from pathlib import Path
with atheris.instrument_imports(include=["dicomnode"]):
    from dicomnode.ingest.multipart import MultipartError, MultipartParser, boundary_from

FOLDER = Path(tempfile.mkdtemp(prefix="fuzz-multipart-"))
BOUNDARY = "xYzZY-boundary"

def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # the Content-Type header of the request
        try:
            b = boundary_from(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        except MultipartError:
            return
        assert b and len(b) <= 70 and b.isascii()
        return
    chunk = fdp.ConsumeIntInRange(1, 64) if mode == 1 else fdp.ConsumeIntInRange(1, 4096)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    parser = MultipartParser(BOUNDARY, FOLDER, max_part_bytes=1 << 16, max_parts=64,
                             max_header_bytes=1024)
    parts = []
    try:
        for i in range(0, len(body), chunk):
            parts += parser.feed(body[i:i + chunk])
        parser.finish()
        for p in parts:
            assert p.path.stat().st_size == p.size
            assert isinstance(p.headers, dict)
    except MultipartError:
        pass
    finally:
        parser.close()
        for p in parts:
            p.discard()
    left = list(FOLDER.iterdir())
    if left:  # a temp file outlived the parser: a leak
        for f in left:
            f.unlink()
        raise AssertionError(f"temp files left behind: {{left}}")
"""

_MAIN = """
if __name__ == "__main__":
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
"""


def _peak_rss_mb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def _run_fuzzer(tmp_path: Path, name: str, body: str, seeds: list[bytes],
                seconds: int, **fmt: object) -> None:
    work = tmp_path / name
    corpus = work / "corpus"
    artifacts = work / "artifacts"
    corpus.mkdir(parents=True)
    artifacts.mkdir()
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    script = work / f"fuzz_{name}.py"
    script.write_text(textwrap.dedent(_PRELUDE).format(root=str(ROOT))
                      + textwrap.dedent(body).format(**fmt) + _MAIN)
    max_len = max([4096, *(len(s) for s in seeds)])
    cmd = [
        sys.executable, str(script),
        f"-max_total_time={seconds}",
        f"-timeout={PER_INPUT_TIMEOUT}",
        # Linux carries the parent's peak RSS into a forked child's ru_maxrss, which
        # libFuzzer reads: the limit is the target's own budget on top of what this
        # pytest process already peaked at (every allocation is capped separately)
        f"-rss_limit_mb={RSS_LIMIT_MB + _peak_rss_mb()}",
        f"-malloc_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={max_len}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    wall = seconds + PER_INPUT_TIMEOUT + 90
    try:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=wall)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        pytest.fail(f"fuzzer {name} hung past {wall} s; artifacts in {artifacts}\n{tail}")
    found = sorted(artifacts.iterdir())
    if proc.returncode != 0 or found:
        repro = "\n".join(f"  reproducer: {p}  (re-run: {sys.executable} {script} {p})"
                          for p in found) or "  (no reproducer written)"
        pytest.fail(f"fuzzer {name} failed (exit {proc.returncode}):\n{repro}\n"
                    f"{proc.stderr[-6000:]}")
    assert "Done" in proc.stderr or "stat::number_of_executed_units" in proc.stderr, \
        proc.stderr[-3000:]


# -- seeds -------------------------------------------------------------------------


def _header_seeds(tmp_path: Path) -> list[bytes]:
    """Real dataset encodings (no file meta, as over DIMSE), one per syntax."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomnode.synthetic import make_ct_series

    src = make_ct_series(tmp_path / "seed-series", 1, 8, 8)[0]
    ds = pydicom.dcmread(src)
    ds.NumberOfStudyRelatedInstances = 3
    item = pydicom.Dataset()
    item.CodeValue = "123"
    inner = pydicom.Dataset()
    inner.CodeMeaning = "x"
    item.ConceptNameCodeSequence = [inner]
    ds.ProcedureCodeSequence = [item]
    del ds.PixelData  # keep seeds small: the header is what is read

    def encode(little: bool, implicit: bool) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_dataset(fp, ds)
        return fp.getvalue()

    implicit = encode(True, True)
    explicit = encode(True, False)
    big = encode(False, False)
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = co.compress(explicit) + co.flush()
    seeds = [
        bytes([SYNTAXES.index("1.2.840.10008.1.2")]) + implicit,
        bytes([SYNTAXES.index("1.2.840.10008.1.2.1")]) + explicit,
        bytes([SYNTAXES.index("1.2.840.10008.1.2.2")]) + big,
        bytes([SYNTAXES.index("1.2.840.10008.1.2.1.99")]) + deflated,
        bytes([SYNTAXES.index("1.2.840.10008.1.2.4.50")]) + explicit,
        bytes([SYNTAXES.index("1.2.3.4")]) + explicit[:200],
    ]
    return seeds


def test_fuzz_read_header(tmp_path: Path) -> None:
    seeds = _header_seeds(tmp_path)
    # the seeds themselves parse (the corpus is meaningful)
    from dicomnode.ingest.header import read_header

    for seed in seeds[:5]:
        assert read_header(seed[1:], SYNTAXES[seed[0]]).study_uid
    _run_fuzzer(tmp_path, "read_header", HEADER_TARGET, seeds, SECONDS, syntaxes=SYNTAXES)


def test_fuzz_validate_uid(tmp_path: Path) -> None:
    seeds = [b"\x00" + u.encode() for u in (
        "1.2.840.10008.1.2.1", "1.2.826.0.1.3680043.8.498.1", "0.0", "1..2", "../etc",
        "1.2.3\x00", "9" * 65)] + [b"\x01/1.2", b"\x02\xff\xfe", b"\x03"]
    _run_fuzzer(tmp_path, "validate_uid", UID_TARGET, seeds, max(3, SECONDS // 3))


def test_fuzz_stow_multipart(tmp_path: Path) -> None:
    pytest.importorskip("dicomnode.ingest.multipart")
    b = b"xYzZY-boundary"
    body = (b"preamble\r\n--" + b + b"\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 4\r\n\r\nDICM\r\n--" + b + b"\r\nContent-Type: application/dicom"
            b"\r\n\r\n" + b"\x00" * 300 + b"\r\n--" + b + b"--\r\nepilogue")
    # mode byte, chunk byte, body (see MULTIPART_TARGET's FuzzedDataProvider use)
    seeds = [
        b"\x00" + b'multipart/related; type="application/dicom"; boundary=' + b,
        b"\x00" + b"multipart/related; boundary=\"a\\\"b\"; type=application/dicom",
        b"\x01\x07" + body,
        b"\x02\xff\x0f" + body,
        b"\x01\x01" + b"--" + b + b"\r\n\r\n\r\n--" + b + b"--",
    ]
    _run_fuzzer(tmp_path, "multipart", MULTIPART_TARGET, seeds, max(3, SECONDS // 3))
