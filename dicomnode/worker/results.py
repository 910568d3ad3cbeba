"""From an inference result to the encoder's input, and the start-up warm-up of the
result path."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.core.records import InferenceResult
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.objects import encode_objects

LOG = logging.getLogger(__name__)


def encode_input(result: InferenceResult, manifest: Manifest, storage: Path,
                 source_paths: list[Path],
                 replaces: Mapping[str, tuple[str, ...]] | None = None) -> EncodeInput:
    """The encoder's input for a result: its labels (held, or read back from disk), the
    measurements, the source instances and what the result replaces."""
    return EncodeInput(
        source_paths=tuple(source_paths),
        labels=result.load_labels(storage),
        manifest=manifest,
        measurements={k: dict(v) for k, v in result.measurements.items()},
        study_uid=result.payload.study_uid,
        series_uid=result.payload.series_uid,
        revision=result.payload.revision,
        device=result.device,
        replaces=dict(replaces or {}),
    )


def warm_up(manifest: Manifest, kinds: Sequence[str]) -> None:
    """Run the result path once on a tiny synthetic series at start-up, so that the first
    real study does not pay for imports and first-call set-up (highdicom, the volume
    loader, dciodvfy): the node stays warm end to end, not only the model."""
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
