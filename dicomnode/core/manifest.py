"""Model manifests: ``models/<name>/manifest.yaml``, typed and validated.

A manifest says what the model is (name, version), what it finds (labels, each with
a SNOMED CT category and type, PS3.16 CID 7150/7151 style codes), which series it
accepts, what it outputs, and how it runs (``runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicomnode.errors import ConfigError


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Model):
    """A coded concept: (value, scheme designator, meaning), e.g. SCT 39607008 'Lung'."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class Label(_Model):
    """One output label of a segmentation model (label value 1..N in its label map)."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    anatomic_region: Code | None = None
    color: tuple[int, int, int] = (255, 0, 0)


class Accepts(_Model):
    """Which series the model can take (checked again by the worker)."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = Field(default=1, ge=1)
    body_parts: tuple[str, ...] = ()


class Manifest(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+$")
    version: str = Field(min_length=1, max_length=32)
    family: str = Field(default="segmentation", max_length=64)
    description: str = ""
    runtime: Literal["builtin", "torchscript", "monai_bundle"]
    entry_point: str | None = Field(
        default=None, description="builtin: 'module_file.py:ClassName' inside the model folder"
    )
    weights: str | None = Field(default=None, description="torchscript: file inside the folder")
    labels: tuple[Label, ...]
    accepts: Accepts = Accepts()
    outputs: tuple[Literal["seg", "sr", "gsps", "sc"], ...] = ("seg", "sr")
    patch_size: tuple[int, int, int] | None = None
    intensity_window: tuple[float, float] | None = None
    mixed_precision: bool = Field(
        default=True, description="torch runtimes on CUDA: run under autocast (float16)")
    attributes: tuple[str, ...] = Field(
        default=(), description="header attributes (DICOM keywords) the model needs besides"
        " voxels and geometry; sent to remote workers, so none may identify the patient")

    @field_validator("attributes")
    @classmethod
    def _shareable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from dicomnode.core.phi import check_shareable

        return tuple(check_shareable(k) for k in value)

    def stray_label_values(self, labels: np.ndarray) -> list[int]:
        """The values in the label map ``labels`` that are neither 0 nor one of this
        model's labels, sorted (empty: the map keeps the manifest).

        The usual map (uint8, values 0..N, all labels) costs one ``max`` over the voxels;
        only a map with gaps or strays is looked at voxel by voxel."""
        allowed = {0} | {label.value for label in self.labels}
        if labels.size == 0:
            return []
        if labels.dtype == np.uint8:
            top = int(labels.max())
            if set(range(top + 1)) <= allowed:
                return []
            lut = np.zeros(256, dtype=bool)
            lut[sorted(v for v in allowed if v < 256)] = True
            bad = ~lut[labels]
            return sorted(int(v) for v in np.unique(labels[bad])) if bad.any() else []
        return sorted(int(v) for v in np.unique(labels) if int(v) not in allowed)


def load_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / "manifest.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", f"cannot read: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("(file)", f"not valid YAML: {exc}")]) from None
    try:
        return Manifest.model_validate(data or {})
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(str(path), problems) from None
