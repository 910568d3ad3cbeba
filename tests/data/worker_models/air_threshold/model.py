"""air_threshold: a test model (see manifest.yaml). Air inside the body, slice by slice."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtime import ModelRuntime, Prediction


class AirThreshold(ModelRuntime):
    def load(self) -> None:
        delay = Path(self.model_dir) / "delay.txt"
        self.delay = float(delay.read_text()) if delay.is_file() else 0.0

    def predict(self, volume: Volume) -> Prediction:
        if volume.modality != "CT":
            raise ValueError(f"air_threshold needs CT, not {volume.modality!r}")
        started = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        body = volume.array > -400
        labels = np.zeros(volume.shape, dtype=np.uint8)
        for k in range(volume.shape[0]):
            inside = ndimage.binary_fill_holes(body[k])
            labels[k][inside & ~body[k]] = 1
        voxels = int(np.count_nonzero(labels))
        return Prediction(
            labels=labels,
            measurements={"lung": {"volume": (voxels * volume.voxel_volume_ml, "ml")}},
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            device="cpu",
            seconds=time.perf_counter() - started,
        )
