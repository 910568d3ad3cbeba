"""The model runtime contract: one abstract base, one file per implementation.

A runtime is created once per model, ``load()``-ed once (the model then stays warm
on its device) and called for every job with ``predict(volume)``.

The base class holds every implementation (the node's and a model folder's own
``builtin`` class) to the contract, whatever its code does: ``predict()`` before
``load()`` raises :class:`ModelNotLoadedError`, and a prediction whose labels are not
uint8 on the volume's (k, i, j) grid, or hold a value that is neither 0 nor one of
the manifest's label values, raises :class:`InvalidPredictionError` instead of
reaching the encoders. ``tests/test_runtime_contract.py`` runs the contract over
every runtime.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.errors import DicomNodeError
from dicomnode.inference.geometry import Volume


class ModelNotLoadedError(DicomNodeError, RuntimeError):
    """``predict()`` was called before ``load()``."""


class InvalidPredictionError(DicomNodeError):
    """A model's output breaks the runtime contract (shape, dtype, label values)."""


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


def check_prediction(prediction: Prediction, volume: Volume, manifest: Manifest) -> Prediction:
    """``prediction`` if it keeps the contract, else InvalidPredictionError naming why."""
    labels = prediction.labels
    name = manifest.name
    if not isinstance(labels, np.ndarray):
        raise InvalidPredictionError(f"model {name}: labels are {type(labels).__name__},"
                                     " not a numpy array")
    if labels.dtype != np.uint8:
        raise InvalidPredictionError(f"model {name}: labels are {labels.dtype}, not uint8")
    if labels.shape != volume.shape:
        raise InvalidPredictionError(f"model {name}: labels have shape {labels.shape}, the"
                                     f" volume {volume.shape} (slice, row, column)")
    stray = manifest.stray_label_values(labels)
    if stray:
        raise InvalidPredictionError(f"model {name}: label value(s) {stray} are not in its"
                                     " manifest")
    return prediction


def _guard_load(load: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(load)
    def guarded(self: ModelRuntime) -> None:
        load(self)
        self._loaded = True
    guarded.__contract__ = True  # type: ignore[attr-defined]
    return guarded


def _guard_predict(predict: Callable[[Any, Volume], Prediction]
                   ) -> Callable[[Any, Volume], Prediction]:
    @functools.wraps(predict)
    def guarded(self: ModelRuntime, volume: Volume) -> Prediction:
        if not getattr(self, "_loaded", False):
            raise ModelNotLoadedError(f"model {self.manifest.name}: predict() before load()")
        return check_prediction(predict(self, volume), volume, self.manifest)
    guarded.__contract__ = True  # type: ignore[attr-defined]
    return guarded


class ModelRuntime(abc.ABC):
    """One model, loaded once and warm on its device (see the module docstring)."""

    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.device = device
        self._loaded = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Hold every implementation to the contract: its own ``load`` marks it loaded,
        its own ``predict`` refuses before that and checks what it returns."""
        super().__init_subclass__(**kwargs)
        for attr, guard in (("load", _guard_load), ("predict", _guard_predict)):
            method = cls.__dict__.get(attr)
            if method is not None and not getattr(method, "__contract__", False) \
                    and not getattr(method, "__isabstractmethod__", False):
                setattr(cls, attr, guard(method))

    @property
    def loaded(self) -> bool:
        return self._loaded

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights/code onto ``self.device`` once."""

    @abc.abstractmethod
    def predict(self, volume: Volume) -> Prediction:
        """Run the model on one volume."""
