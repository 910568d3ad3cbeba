"""From a stored prediction to checked DICOM objects in the outbox.

For each destination of a job, the objects it asks for (SEG, SR, GSPS, SC) are
encoded once per job, checked (read back with highdicom, and dciodvfy where it is
installed), written atomically under the job's result folder and queued in the
outbox for that destination. Everything is deterministic and idempotent: result
UIDs derive from the source and the model, objects already written are reused,
and the outbox keeps one delivery per (destination, SOP Instance UID), so a retry
or a re-run after a crash neither duplicates nor loses a result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import Destination
from dicomnode.core.manifest import Manifest
from dicomnode.encode.base import KINDS, EncodeInput
from dicomnode.encode.validate import ensure_valid

LOG = logging.getLogger(__name__)


def _write_checked(ds: Dataset, path: Path) -> None:
    """Write ``ds``, check the very bytes written (read back + dciodvfy), then fsync and
    rename into place: an object that fails its check never gets a final name."""
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    try:
        ensure_valid(tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def kinds_for(destinations: Sequence[Destination]) -> list[str]:
    """Every object kind any of ``destinations`` asks for, in a fixed order (SR needs SEG)."""
    wanted = {k for d in destinations for k in d.objects}
    if "sr" in wanted:
        wanted.add("seg")
    return [k for k in KINDS if k in wanted]


def encode_objects(inp: EncodeInput, kinds: Sequence[str], out_dir: Path) -> dict[str, list[Path]]:
    """Encode, check and write the ``kinds`` asked for; reuse what a previous attempt wrote."""
    from dicomnode.encode.gsps import encode_gsps
    from dicomnode.encode.sc import encode_sc
    from dicomnode.encode.seg import encode_seg
    from dicomnode.encode.sr import encode_sr

    out: dict[str, list[Path]] = {}
    seg: Dataset | None = None
    for kind in kinds:
        folder = out_dir / kind
        done = folder / ".complete"
        if done.exists():
            out[kind] = sorted(folder.glob("*.dcm"))
            if kind == "seg" and "sr" in kinds:
                seg = dcmread(out[kind][0])
            continue
        if kind == "seg":
            seg = encode_seg(inp)
            datasets = [seg]
        elif kind == "sr":
            assert seg is not None, "SEG is encoded before SR"
            datasets = [encode_sr(inp, seg)]
        elif kind == "gsps":
            datasets = list(encode_gsps(inp))
        else:
            datasets = list(encode_sc(inp))
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            _write_checked(ds, path)  # every object is checked before it can leave
            paths.append(path)
        done.touch()
        out[kind] = paths
        LOG.info("encoded %d %s object(s) for study %s", len(paths), kind.upper(), inp.study_uid)
    return out


def encode_input(result: dict[str, object], manifest: Manifest, storage: Path,
                 source_paths: list[Path], replaces: dict[str, tuple[str, ...]] | None = None,
                 labels: np.ndarray | None = None) -> EncodeInput:
    """The EncodeInput of a stored prediction (``result`` as the worker records it);
    ``labels`` when the caller still holds them, else they are read back from disk."""
    if labels is None:
        labels = np.load(storage / str(result["labels_path"]))["labels"]
    measurements = {
        name: {q: (float(v[0]), str(v[1])) for q, v in quantities.items()}
        for name, quantities in dict(result["measurements"]).items()  # type: ignore[call-overload]
    }
    return EncodeInput(
        source_paths=tuple(source_paths),
        labels=labels,
        manifest=manifest,
        measurements=measurements,
        study_uid=str(result["study_uid"]),
        series_uid=str(result["series_uid"]),
        revision=int(result["revision"]),  # type: ignore[call-overload]
        device=str(result.get("device", "cpu")),
        replaces=replaces or {},
    )


def warm_up(manifest: Manifest, kinds: Sequence[str]) -> None:
    """Run the result path once on a tiny synthetic series at start-up, so that the first
    real study does not pay for imports and first-call set-up (highdicom, the volume
    loader, dciodvfy): the node stays warm end to end, not only the model."""
    import tempfile
    import time

    from dicomnode.inference.volume import load_series
    from dicomnode.synthetic import make_ct_series

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dicomnode-warmup-") as tmp:
        paths = make_ct_series(Path(tmp) / "src", 8, 512, 512)  # real-sized slices
        volume = load_series(paths)
        labels = np.zeros(volume.shape, dtype=np.uint8)
        for i, label in enumerate(manifest.labels):
            labels[:, 40 + 60 * i : 80 + 60 * i, 40:120] = label.value
        names = [label.name for label in manifest.labels]
        inp = EncodeInput(
            source_paths=tuple(paths), labels=labels, manifest=manifest,
            measurements={n: {"volume": (1.0, "ml")} for n in names},
            study_uid=volume.study_uid, series_uid=volume.series_uid,
        )
        encode_objects(inp, kinds, Path(tmp) / "out")
    LOG.info("result path warmed up for %s in %.2f s", manifest.name,
             time.perf_counter() - started)
