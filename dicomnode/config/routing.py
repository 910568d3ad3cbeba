"""Routing rules (``routing:``): which series go to which model, and the embedded
default that makes the node do its main job with no config file."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from dicomnode.config.base import Model


class _Range(Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is larger than max ({self.max:g})")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _check_regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]


class SeriesMatch(Model):
    """What a series (and its study) must look like for a rule to match.

    Every field given must match; fields left out match anything. Regular
    expressions are searched (not anchored) and case-insensitive.
    """

    modality: tuple[str, ...] | None = Field(default=None, description="any of these Modality values")
    body_part: Regex | None = Field(
        default=None,
        description="searched in BodyPartExamined; where that is empty, in the study and series"
        " descriptions and protocol name",
    )
    study_description: Regex | None = None
    series_description: Regex | None = None
    image_type: tuple[str, ...] | None = Field(
        default=None, description="every one of these values must be in ImageType"
    )
    exclude_image_type: tuple[str, ...] = Field(
        default=("LOCALIZER",), description="no one of these values may be in ImageType"
    )
    orientation: Literal["axial", "sagittal", "coronal"] | None = None
    slice_thickness: _Range | None = None
    instances: _Range | None = None
    calling_ae: Regex | None = None
    called_ae: Regex | None = None


class Rule(Model):
    """One routing rule: which series go to which model, and where the results go."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    match: SeriesMatch = SeriesMatch()
    select: Literal["thinnest", "most_instances", "all"] = Field(
        default="thinnest",
        description="among matching series: the thinnest (ties: most instances), the one with"
        " most instances, or every one",
    )
    model: str = Field(min_length=1)
    destinations: tuple[str, ...] = ()
    priority: Literal["stat", "routine"] = "routine"
    final: bool = Field(default=False, description="when it matches, later rules are not tried")
    keep: tuple[Literal["seg", "sr", "gsps", "sc"], ...] = Field(
        default=("seg", "sr"),
        description="result objects the node encodes, checks and keeps itself (served over"
        " DICOMweb, on the status page and in /viewer/), with or without destinations",
    )


#: The rule that makes the node do its main job on its embedded defaults: an axial chest
#: CT of enough slices, no thicker than the lung model handles, goes to lung_density, and
#: its SEG and SR are kept in the node (no destination: add one, or '@sender').
DEFAULT_ROUTING: tuple[Rule, ...] = (
    Rule(name="chest-ct-lung-density", model="lung_density",
         match=SeriesMatch(modality=("CT",), body_part="chest|lung|thorax",
                           orientation="axial", slice_thickness=_Range(max=5.0),
                           instances=_Range(min=20))),
)
