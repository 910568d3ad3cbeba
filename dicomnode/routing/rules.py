"""Routing rules: which series of a completed study go to which model.

A rule (``config.Rule``) matches attributes of a series and its study; among the
matching series of a study it selects one (the thinnest, or the one with the most
instances) or all, and names the model, the destinations and the priority. Rules
are tried in order; every matching rule makes a job, unless an earlier matching
rule is ``final``. Every decision comes with its reasons, so that ``dicomnode
rules test`` can say why a series did *not* match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import Rule, SeriesMatch

LOG = logging.getLogger(__name__)

_HEADER_TAGS = [
    "StudyInstanceUID", "SeriesInstanceUID", "Modality", "BodyPartExamined",
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageType", "SliceThickness",
    "ImageOrientationPatient", "SOPClassUID",
]


@dataclass(frozen=True)
class SeriesInfo:
    """The attributes rules look at, for one series (from one of its instances)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    protocol_name: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    orientation: str | None = None  # axial / sagittal / coronal / oblique
    instances: int = 0
    calling_ae: str = ""
    called_ae: str = ""
    paths: tuple[Path, ...] = field(default=(), compare=False, repr=False)

    def describe(self) -> str:
        bits = [self.modality or "?", self.series_description or "(no description)"]
        if self.slice_thickness is not None:
            bits.append(f"{self.slice_thickness:g} mm")
        bits.append(f"{self.instances} instances")
        return ", ".join(bits)


def orientation_of(iop: Sequence[float] | None) -> str | None:
    """Name the plane of an ImageOrientationPatient by its normal's main axis."""
    if iop is None or len(iop) != 6:
        return None
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm == 0:
        return None
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if normal[axis] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def series_info_from_dataset(
    ds: Dataset, instances: int, calling_ae: str = "", called_ae: str = "",
    paths: Iterable[Path] = (),
) -> SeriesInfo:
    thickness = ds.get("SliceThickness")
    try:
        thickness_v = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_v = None
    image_type = ds.get("ImageType")
    if image_type is None:
        types: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        types = tuple(image_type.split("\\"))
    else:
        types = tuple(str(v) for v in image_type)
    return SeriesInfo(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        image_type=tuple(t.strip().upper() for t in types),
        slice_thickness=thickness_v,
        orientation=orientation_of(ds.get("ImageOrientationPatient")),
        instances=instances,
        calling_ae=calling_ae,
        called_ae=called_ae,
        paths=tuple(paths),
    )


def read_header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def series_from_files(paths: Iterable[Path]) -> tuple[list[SeriesInfo], list[tuple[Path, str]]]:
    """Group DICOM files into series; returns (series, [(file, why it was skipped)])."""
    groups: dict[str, list[Path]] = {}
    first: dict[str, Dataset] = {}
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            ds = read_header(path)
            uid = str(ds.SeriesInstanceUID)
        except Exception as exc:
            skipped.append((path, f"not a readable DICOM instance: {exc}"))
            continue
        groups.setdefault(uid, []).append(path)
        first.setdefault(uid, ds)
    infos = [
        series_info_from_dataset(first[uid], len(files), paths=files)
        for uid, files in groups.items()
    ]
    return infos, skipped


# -- matching -------------------------------------------------------------------


def _search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def mismatches(match: SeriesMatch, s: SeriesInfo) -> list[str]:
    """Every reason why ``s`` does not match; empty when it matches."""
    why: list[str] = []
    if match.modality is not None and s.modality.upper() not in {m.upper() for m in match.modality}:
        why.append(f"Modality is {s.modality or '(none)'}, not {'/'.join(match.modality)}")
    if match.body_part is not None:
        if s.body_part:
            if not _search(match.body_part, s.body_part):
                why.append(f"BodyPartExamined {s.body_part!r} does not match /{match.body_part}/")
        else:
            texts = [s.study_description, s.series_description, s.protocol_name]
            if not any(t and _search(match.body_part, t) for t in texts):
                why.append(
                    f"no BodyPartExamined, and neither description nor protocol name"
                    f" matches /{match.body_part}/"
                )
    for attr, keyword in (("study_description", "StudyDescription"),
                          ("series_description", "SeriesDescription")):
        pattern = getattr(match, attr)
        value = getattr(s, attr)
        if pattern is not None and not _search(pattern, value):
            why.append(f"{keyword} {value!r} does not match /{pattern}/")
    if match.image_type is not None:
        missing = [t for t in match.image_type if t.upper() not in s.image_type]
        if missing:
            why.append(f"ImageType {'/'.join(s.image_type) or '(none)'} lacks {'/'.join(missing)}")
    excluded = [t for t in match.exclude_image_type if t.upper() in s.image_type]
    if excluded:
        why.append(f"ImageType contains {'/'.join(excluded)}")
    if match.orientation is not None and s.orientation != match.orientation:
        why.append(f"orientation is {s.orientation or 'unknown'}, not {match.orientation}")
    if match.slice_thickness is not None:
        if s.slice_thickness is None:
            why.append("SliceThickness is missing")
        elif not match.slice_thickness.contains(s.slice_thickness):
            why.append(f"SliceThickness {s.slice_thickness:g} mm is outside"
                       f" {_range_text(match.slice_thickness.min, match.slice_thickness.max)}")
    if match.instances is not None and not match.instances.contains(s.instances):
        why.append(f"{s.instances} instances, outside"
                   f" {_range_text(match.instances.min, match.instances.max)}")
    if match.calling_ae is not None and not _search(match.calling_ae, s.calling_ae):
        why.append(f"calling AE {s.calling_ae!r} does not match /{match.calling_ae}/")
    if match.called_ae is not None and not _search(match.called_ae, s.called_ae):
        why.append(f"called AE {s.called_ae!r} does not match /{match.called_ae}/")
    return why


def _range_text(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


@dataclass(frozen=True)
class RouteDecision:
    """A rule matched: run ``model`` on ``series`` and send results to ``destinations``."""

    rule: str
    model: str
    series: SeriesInfo
    destinations: tuple[str, ...]
    priority: str


@dataclass
class RuleReport:
    """For one rule: the series it matched and, for the others, why not."""

    rule: Rule
    selected: list[SeriesInfo] = field(default_factory=list)
    matched: list[SeriesInfo] = field(default_factory=list)
    rejected: list[tuple[SeriesInfo, list[str]]] = field(default_factory=list)
    skipped_reason: str | None = None


def _select(rule: Rule, matched: list[SeriesInfo]) -> list[SeriesInfo]:
    if not matched or rule.select == "all":
        return list(matched)
    if rule.select == "most_instances":
        return [max(matched, key=lambda s: (s.instances, s.series_uid))]
    # thinnest; unknown thickness last; ties broken by more instances
    return [min(matched, key=lambda s: (s.slice_thickness is None, s.slice_thickness or 0.0,
                                        -s.instances, s.series_uid))]


def evaluate(rules: Sequence[Rule], series: Sequence[SeriesInfo]) -> list[RuleReport]:
    """Apply the ordered rules to the series of one study; explain every outcome."""
    reports: list[RuleReport] = []
    stopped_by: str | None = None
    for rule in rules:
        report = RuleReport(rule)
        reports.append(report)
        if stopped_by is not None:
            report.skipped_reason = f"not tried: final rule {stopped_by!r} matched before"
            continue
        for s in series:
            why = mismatches(rule.match, s)
            if why:
                report.rejected.append((s, why))
            else:
                report.matched.append(s)
        report.selected = _select(rule, report.matched)
        if report.selected and rule.final:
            stopped_by = rule.name
    return reports


def decide(rules: Sequence[Rule], series: Sequence[SeriesInfo]) -> list[RouteDecision]:
    """The jobs a study's series make under the rules (empty: nothing runs)."""
    out = []
    for report in evaluate(rules, series):
        for s in report.selected:
            out.append(RouteDecision(report.rule.name, report.rule.model, s,
                                     report.rule.destinations, report.rule.priority))
    return out


def explain(reports: Sequence[RuleReport]) -> str:
    """Human-readable text of ``evaluate``'s reports (for ``dicomnode rules test``)."""
    lines: list[str] = []
    for report in reports:
        rule = report.rule
        lines.append(f"rule {rule.name!r} -> model {rule.model}"
                     f" ({rule.priority}, select {rule.select}):")
        if report.skipped_reason:
            lines.append(f"  {report.skipped_reason}")
            continue
        for s in report.selected:
            lines.append(f"  SELECTED  series {s.series_uid} ({s.describe()})")
        for s in report.matched:
            if s not in report.selected:
                lines.append(f"  matched, not selected ({rule.select})  series {s.series_uid}"
                             f" ({s.describe()})")
        for s, why in report.rejected:
            lines.append(f"  no match  series {s.series_uid} ({s.describe()}):")
            lines.extend(f"      - {w}" for w in why)
        if not report.matched and not report.rejected:
            lines.append("  no series")
    if not reports:
        lines.append("no routing rules configured: nothing would run")
    return "\n".join(lines)
