"""From a prediction to checked DICOM objects on disk.

The objects a job's destinations ask for (SEG, SR, GSPS, SC) are encoded once per job,
checked (read back with highdicom, and dciodvfy where it is installed) and written
atomically under the job's result folder. Everything is deterministic and idempotent:
result UIDs derive from the source and the model, and objects already written by an
earlier attempt are reused, so a retry or a re-run after a crash neither duplicates nor
loses a result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import Destination
from dicomnode.core.layout import atomic_write
from dicomnode.encode.base import KINDS, EncodeInput
from dicomnode.encode.seg import SegPlan
from dicomnode.encode.validate import ensure_valid

LOG = logging.getLogger(__name__)


def _write_checked(ds: Dataset, path: Path) -> None:
    """Write ``ds``, check the very bytes written (read back + dciodvfy), then fsync and
    rename into place: an object that fails its check never gets a final name."""
    def write(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)
        ensure_valid(tmp)

    atomic_write(path, write)


def kinds_for(destinations: Sequence[Destination], keep: Sequence[str] = ()) -> list[str]:
    """Every object kind any of ``destinations`` asks for, or the node keeps itself
    (``keep``), in a fixed order (SR needs SEG)."""
    wanted = {k for d in destinations for k in d.objects} | set(keep)
    if "sr" in wanted:
        wanted.add("seg")
    return [k for k in KINDS if k in wanted]


def encode_objects(inp: EncodeInput, kinds: Sequence[str], out_dir: Path,
                   seg_plan: SegPlan | None = None) -> dict[str, list[Path]]:
    """Encode, check and write the ``kinds`` asked for; reuse what a previous attempt wrote.
    ``seg_plan``: the SEG made while the model ran (:func:`dicomnode.encode.seg.plan_seg`).

    Each object is written and checked (read back + dciodvfy, :func:`_write_checked`) in
    a thread of its own while the next one is encoded: the SR is encoded while the SEG's
    dciodvfy runs. Every object is still checked before it gets its final name, and a
    kind is marked complete only once all its objects are.
    """
    from dicomnode.encode.gsps import encode_gsps
    from dicomnode.encode.sc import encode_sc
    from dicomnode.encode.seg import encode_seg
    from dicomnode.encode.sr import encode_sr

    out: dict[str, list[Path]] = {}
    seg: Dataset | None = None
    pending: list[tuple[str, Future[list[Path]]]] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode-check") as pool:
        try:
            for kind in kinds:
                folder = out_dir / kind
                if (folder / ".complete").exists():
                    out[kind] = sorted(folder.glob("*.dcm"))
                    if kind == "seg" and "sr" in kinds:
                        seg = dcmread(out[kind][0])
                    continue
                if kind == "seg":
                    seg = encode_seg(inp, seg_plan)
                    datasets = [seg]
                elif kind == "sr":
                    assert seg is not None, "SEG is encoded before SR"
                    datasets = [encode_sr(inp, seg)]
                elif kind == "gsps":
                    datasets = list(encode_gsps(inp))
                else:
                    datasets = list(encode_sc(inp))
                pending.append((kind, pool.submit(_write_kind, kind, datasets, folder, inp.study_uid)))
        finally:
            # wait for every check; the first failure is raised, kinds that passed are kept
            error: BaseException | None = None
            for _kind, future in pending:
                exc = future.exception()
                if exc is not None:
                    error = error or exc
            if error is not None:
                raise error
    for kind, future in pending:
        out[kind] = future.result()
    return {k: out[k] for k in kinds}


def _write_kind(kind: str, datasets: Sequence[Dataset], folder: Path, study_uid: str) -> list[Path]:
    """Write and check (:func:`_write_checked`) the objects of one kind, then mark the
    kind complete."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        _write_checked(ds, path)  # every object is checked before it can leave
        paths.append(path)
    (folder / ".complete").touch()
    LOG.info("encoded %d %s object(s) for study %s", len(paths), kind.upper(), study_uid)
    return paths
