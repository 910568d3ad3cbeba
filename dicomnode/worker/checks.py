"""What the node checks of what a remote worker sends: the label map and its header
against the job and the model's manifest, and the fields of a heartbeat."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.queue.base import Job
from dicomnode.worker import wire

MAX_MEASUREMENT_NAME = 64
MAX_UNIT = 32


@dataclass(frozen=True)
class Expected:
    """What the node sent for a job (``remote-input.json``): the result must match it."""

    job: Job
    shape: tuple[int, int, int]
    sop_instance_uids: tuple[str, ...]
    slice_keys: tuple[str, ...]

    @property
    def max_bytes(self) -> int:
        return int(math.prod(self.shape))  # uint8 labels


def check_labels(header: dict[str, Any], labels: np.ndarray, expected: Expected,
                 manifest: Manifest) -> np.ndarray:
    """The label map in the node's slice order, once it matches the job and the manifest;
    raises :class:`~dicomnode.worker.wire.WireError` naming what does not."""
    job = expected.job
    if header.get("job") != job.id:
        raise wire.WireError(f"the result is for job {header.get('job')!r}, not {job.id}")
    if header.get("model") != manifest.name or header.get("model_version") != manifest.version:
        raise wire.WireError(
            f"made by {header.get('model')!r} {header.get('model_version')!r}; the node's"
            f" manifest is {manifest.name} {manifest.version} (update the worker's model)")
    if tuple(labels.shape) != expected.shape:
        raise wire.WireError(f"label map shape {tuple(labels.shape)}, the volume was"
                             f" {expected.shape}")
    if labels.dtype != np.uint8:
        raise wire.WireError(f"label map dtype {labels.dtype}, uint8 expected")
    keys = header.get("slice_keys")
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(expected.slice_keys):
        raise wire.WireError("slice_keys do not match the slices that were sent")
    if len(set(keys)) != len(keys):
        raise wire.WireError("slice_keys repeat a slice")
    position = {k: i for i, k in enumerate(keys)}
    order = [position[k] for k in expected.slice_keys]
    ordered = labels if order == list(range(len(order))) else labels[order]
    stray = manifest.stray_label_values(ordered)
    if stray:
        allowed = sorted({0} | {label.value for label in manifest.labels})
        raise wire.WireError(f"label values {stray} are not in the manifest"
                             f" (allowed: {allowed})")
    names = {label.name for label in manifest.labels} | {"total"}
    measurements = header.get("measurements")
    if not isinstance(measurements, dict):
        raise wire.WireError("measurements: a mapping of label name to quantities expected")
    for name, quantities in measurements.items():
        if name not in names:
            raise wire.WireError(f"measurements: {name!r} is not a label of the manifest")
        if not isinstance(quantities, dict):
            raise wire.WireError(f"measurements.{name}: a mapping of quantity to value expected")
        for q, v in quantities.items():
            if (not isinstance(q, str) or not 0 < len(q) <= MAX_MEASUREMENT_NAME
                    or not isinstance(v, list) or len(v) != 2
                    or not isinstance(v[0], int | float) or isinstance(v[0], bool)
                    or not math.isfinite(v[0]) or not isinstance(v[1], str)
                    or not 0 < len(v[1]) <= MAX_UNIT):
                raise wire.WireError(f"measurements.{name}.{q}: [finite value, unit] expected")
    seconds = header.get("seconds")
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise wire.WireError("seconds: a finite, non-negative number expected")
    if not isinstance(header.get("device"), str) or len(header["device"]) > 64:
        raise wire.WireError("device: a short string expected")
    return np.ascontiguousarray(ordered)


# -- heartbeats -------------------------------------------------------------------


def plain_value(value: Any) -> Any:
    """A header value as plain JSON (pydicom's DS/IS are float/int subclasses)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    return str(value)


def text_field(d: dict[str, Any], key: str, limit: int) -> str:
    value = d[key]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"{key}: a string of 1..{limit} characters expected")
    return value


def list_field(d: dict[str, Any], key: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list) or len(value) > 256:
        raise ValueError(f"{key}: a list expected")
    return value


def model_name_field(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ValueError("models: names of 1..64 characters expected")
    return value


def number_field(d: dict[str, Any], key: str) -> float:
    value = d[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key}: a number expected")
    return float(value)


def optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("job_id: an integer expected")
    return value
