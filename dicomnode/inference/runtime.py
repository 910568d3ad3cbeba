"""The model runtime contract: one abstract base, one file per implementation.

A runtime is created once per model, ``load()``-ed once (the model then stays warm
on its device) and called for every job with ``predict(volume)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.inference.geometry import Volume


@dataclass(frozen=True, eq=False)
class Prediction:
    """What a model made of one volume.

    ``labels`` has the volume's shape (k, i, j), dtype uint8, 0 = background and
    the manifest's label values elsewhere. ``measurements`` maps a label name (or
    "total") to named quantities, each ``(value, UCUM unit)``.
    """

    labels: np.ndarray
    measurements: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    device: str = "cpu"
    seconds: float = 0.0


class ModelRuntime(abc.ABC):
    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.device = device

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights/code onto ``self.device`` once."""

    @abc.abstractmethod
    def predict(self, volume: Volume) -> Prediction:
        """Run the model on one volume."""
