"""What flows between the stages of a job, typed and frozen.

* :class:`JobPayload`: what routing puts in the queue for one job (the study revision,
  the series, the rule and its destinations);
* :class:`InferenceResult`: what a model made of it (labels on the source grid,
  measurements, the model's identity and timings), kept as ``prediction.json`` +
  ``labels.npz`` in the job's result folder so that a job that died after inference
  is not computed twice;
* :class:`ResultSet`: the objects encoded from a result (SOP Instance UIDs per kind)
  and those of the previous revision they replace.

The queue and the result folder store them as JSON; these classes are the only code
that writes or reads that JSON (``to_json`` / ``from_json``), and ``from_json``
validates what it reads, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.core.layout import JobKey

__all__ = ["InferenceResult", "JobPayload", "Measurements", "ResultSet"]

#: label name (or "total") -> quantity -> (value, UCUM unit)
Measurements = Mapping[str, Mapping[str, tuple[float, str]]]


def _field(data: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    if name not in data:
        raise ValueError(f"{what}: {name} is missing")
    value = data[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{what}: {name} must be {kind.__name__}, not {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class JobPayload:
    """What one job asks: run ``JobKey.model`` on ``series_uid`` of a study revision."""

    study_uid: str
    revision: int
    series_uid: str
    rule: str
    destinations: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()  # result kinds the node keeps itself, destinations or not

    def key(self, model: str) -> JobKey:
        return JobKey(self.study_uid, self.revision, self.rule, self.series_uid, model)

    def to_json(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "revision": self.revision,
                "series_uid": self.series_uid, "rule": self.rule,
                "destinations": list(self.destinations), "keep": list(self.keep)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobPayload:
        what = "job payload"
        dests = data.get("destinations") or []
        if not isinstance(dests, list | tuple) or not all(isinstance(d, str) for d in dests):
            raise ValueError(f"{what}: destinations must be a list of names")
        keep = data.get("keep") or []
        if not isinstance(keep, list | tuple) or not all(isinstance(k, str) for k in keep):
            raise ValueError(f"{what}: keep must be a list of result kinds")
        return cls(_field(data, "study_uid", str, what), _field(data, "revision", int, what),
                   _field(data, "series_uid", str, what), _field(data, "rule", str, what),
                   tuple(dests), tuple(keep))


def _measurements_from_json(raw: Any) -> dict[str, dict[str, tuple[float, str]]]:
    if not isinstance(raw, Mapping):
        raise ValueError("inference result: measurements must be a mapping")
    out: dict[str, dict[str, tuple[float, str]]] = {}
    for name, quantities in raw.items():
        if not isinstance(quantities, Mapping):
            raise ValueError(f"inference result: measurements of {name!r} must be a mapping")
        out[str(name)] = {str(q): (float(v[0]), str(v[1])) for q, v in quantities.items()}
    return out


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """A model's prediction on one job's series.

    ``labels`` (uint8, the volume's (slice, row, column) grid) is held while the
    worker that computed it goes on to encode; a result read back from disk has
    ``labels`` None and :meth:`load_labels` reads ``labels_path``.
    """

    job_key: str
    model: str
    model_version: str
    device: str
    payload: JobPayload
    sop_instance_uids: tuple[str, ...]
    shape: tuple[int, int, int]
    labels_path: str  # relative to the storage folder
    measurements: Measurements
    seconds: float
    model_seconds: float
    labels: np.ndarray | None = field(default=None, repr=False)

    def load_labels(self, storage: Any) -> np.ndarray:
        """The label map: held in memory, or read back from ``labels_path``."""
        if self.labels is not None:
            return self.labels
        from pathlib import Path

        with np.load(Path(storage) / self.labels_path) as npz:
            return np.asarray(npz["labels"])

    def to_json(self) -> dict[str, Any]:
        return {
            "job_key": self.job_key, "model": self.model, "model_version": self.model_version,
            "device": self.device, **self.payload.to_json(),
            "sop_instance_uids": list(self.sop_instance_uids), "shape": list(self.shape),
            "labels_path": self.labels_path,
            "measurements": {k: {m: list(v) for m, v in q.items()}
                             for k, q in self.measurements.items()},
            "seconds": self.seconds, "model_seconds": self.model_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InferenceResult:
        what = "inference result"
        shape = data.get("shape")
        if not isinstance(shape, list | tuple) or len(shape) != 3:
            raise ValueError(f"{what}: shape must be three numbers")
        uids = data.get("sop_instance_uids")
        if not isinstance(uids, list | tuple):
            raise ValueError(f"{what}: sop_instance_uids must be a list")
        return cls(
            job_key=_field(data, "job_key", str, what), model=_field(data, "model", str, what),
            model_version=str(data.get("model_version", "")),
            device=str(data.get("device", "cpu")), payload=JobPayload.from_json(data),
            sop_instance_uids=tuple(str(u) for u in uids),
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            labels_path=_field(data, "labels_path", str, what),
            measurements=_measurements_from_json(data.get("measurements", {})),
            seconds=float(data.get("seconds", 0.0)),
            model_seconds=float(data.get("model_seconds", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class ResultSet:
    """The objects encoded from one job (SOP Instance UIDs per kind: seg, sr, gsps, sc)
    and, for a later revision, those of the previous revision that they replace."""

    job_key: str
    study_uid: str
    objects: Mapping[str, tuple[str, ...]]
    replaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"job_key": self.job_key, "study_uid": self.study_uid,
                "objects": {k: list(v) for k, v in self.objects.items()},
                "replaces": {k: list(v) for k, v in self.replaces.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultSet:
        def kinds(raw: Any, name: str) -> dict[str, tuple[str, ...]]:
            if not isinstance(raw, Mapping):
                raise ValueError(f"result set: {name} must be a mapping of kind to UIDs")
            return {str(k): tuple(str(u) for u in v) for k, v in raw.items()}
        return cls(_field(data, "job_key", str, "result set"),
                   _field(data, "study_uid", str, "result set"),
                   kinds(data.get("objects", {}), "objects"),
                   kinds(data.get("replaces", {}), "replaces"))
