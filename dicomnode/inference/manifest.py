"""Model manifests: ``models/<name>/manifest.yaml``, typed and validated.

A manifest says what the model is (name, version), what it finds (labels, each with
a SNOMED CT category and type, PS3.16 CID 7150/7151 style codes), which series it
accepts, what it outputs, and how it runs (``runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    amp: bool = Field(
        default=True,
        description="torch runtimes: mixed precision (float16 autocast) on CUDA; off: float32",
    )


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
