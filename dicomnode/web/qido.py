"""QIDO-RS (PS3.18 10.6): search the studies, series and instances the node holds.

Everything is answered from the index, in SQL (:mod:`dicomnode.core.search`): the
attributes were stored at admission, so a search never opens a file.

The request (PS3.18 8.3.4) is read strictly: every query key is an attribute keyword or
tag of the DICOM dictionary (PS3.6), else 400; a key below the resource's level (an
instance attribute in a study search) is 400; a value its attribute cannot have (a
malformed date range, a UID with letters, a non-numeric ``limit``) is 400. A valid key
that the node cannot match on is not silently ignored: the answer carries a
``Warning: 299 <service>: "..."`` header naming it (as PS3.18 8.3.4.2 prescribes for
``fuzzymatching``). ``includefield`` (keywords, tags, or ``all``) adds attributes the
node holds at the resource's level or above; an unknown one is 400.

Answers are in arrival order, paged by ``limit``/``offset`` in SQL; without a
``limit``, at most :data:`MAX_RESULTS` come back with the PS3.18 8.3.4.4 warning that
more can be requested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from dicomnode.core.dicomweb import HTTPError, base_url
from dicomnode.core.index import Index
from dicomnode.core.search import MATCHING, Condition, Level, Search, SearchError

__all__ = ["MAX_RESULTS", "Qido", "QidoAnswer"]

#: the most results one search answers when the request gives no (smaller) limit
MAX_RESULTS: dict[Level, int] = {"study": 5000, "series": 5000, "instance": 20000}

_RANK = {"study": 0, "series": 1, "instance": 2}

#: attribute keyword -> (tag, VR, level) of everything a search can return
_ATTRIBUTES: dict[str, tuple[str, str, Level]] = {
    "StudyDate": ("00080020", "DA", "study"), "StudyTime": ("00080030", "TM", "study"),
    "AccessionNumber": ("00080050", "SH", "study"),
    "ModalitiesInStudy": ("00080061", "CS", "study"),
    "ReferringPhysicianName": ("00080090", "PN", "study"),
    "StudyDescription": ("00081030", "LO", "study"),
    "PatientName": ("00100010", "PN", "study"), "PatientID": ("00100020", "LO", "study"),
    "PatientBirthDate": ("00100030", "DA", "study"), "PatientSex": ("00100040", "CS", "study"),
    "StudyInstanceUID": ("0020000D", "UI", "study"), "StudyID": ("00200010", "SH", "study"),
    "NumberOfStudyRelatedSeries": ("00201206", "IS", "study"),
    "NumberOfStudyRelatedInstances": ("00201208", "IS", "study"),
    "Modality": ("00080060", "CS", "series"),
    "SeriesDescription": ("0008103E", "LO", "series"),
    "SeriesInstanceUID": ("0020000E", "UI", "series"),
    "SeriesNumber": ("00200011", "IS", "series"),
    "NumberOfSeriesRelatedInstances": ("00201209", "IS", "series"),
    "SOPClassUID": ("00080016", "UI", "instance"),
    "SOPInstanceUID": ("00080018", "UI", "instance"),
    "AvailableTransferSyntaxUID": ("00083002", "UI", "instance"),
    "InstanceNumber": ("00200013", "IS", "instance"),
    "Rows": ("00280010", "US", "instance"), "Columns": ("00280011", "US", "instance"),
    "NumberOfFrames": ("00280008", "IS", "instance"),
}
#: returned without being asked for (PS3.18 Tables 10.6.3-3, -4, -5; Study Description
#: too, which viewers' worklists show)
_DEFAULTS: dict[Level, tuple[str, ...]] = {
    "study": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances", "StudyInstanceUID"),
    "instance": ("SOPClassUID", "SOPInstanceUID", "AvailableTransferSyntaxUID",
                 "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                 "StudyInstanceUID", "SeriesInstanceUID", "Modality"),
}
_BOOLEAN_PARAMS = ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


@dataclass
class QidoAnswer:
    """The matches as DICOM JSON, and the Warning header values that go with them."""

    items: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def keyword_of(name: str) -> str | None:
    """The dictionary keyword of a query key given as keyword or tag; None if PS3.6 has no
    such attribute."""
    from pydicom.datadict import dictionary_has_tag, keyword_for_tag, tag_for_keyword

    if _TAG.match(name):
        tag = int(name, 16)
        if not dictionary_has_tag(tag):
            return None
        return keyword_for_tag(tag) or None
    return name if tag_for_keyword(name) is not None else None


@dataclass
class _Request:
    conditions: list[Condition]
    include: set[str]
    include_all: bool
    limit: int | None
    offset: int
    warnings: list[str]


class Qido:
    """The QIDO-RS searches over one index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def search(self, request: Request, level: Level, study: str | None = None,
               series: str | None = None) -> QidoAnswer:
        """Answer one search of ``level`` (within the study/series the URL names)."""
        parsed = self._parse(request, level)
        query = Search(level, tuple(parsed.conditions), study, series, parsed.limit,
                       parsed.offset)
        try:
            rows, more = self.index.search(query, MAX_RESULTS[level])
        except SearchError as exc:
            raise HTTPError(400, str(exc)) from None
        service = base_url(request)
        if more:
            parsed.warnings.append("There are additional results that can be requested")
        wanted = self._returned(level, parsed, study is None, series is None)
        items = [self._json(row, wanted, level, service) for row in rows]
        return QidoAnswer(items, [f'299 {service}: "{w}"' for w in parsed.warnings])

    # -- the request -------------------------------------------------------------------

    def _parse(self, request: Request, level: Level) -> _Request:
        out = _Request([], set(), False, None, 0, [])
        seen: set[str] = set()
        unsupported: list[str] = []
        for key, value in request.query_params.multi_items():
            key = key.strip()
            if not key:  # "?&..." as some viewers send
                continue
            if key in ("limit", "offset"):
                number = _uint(key, value)
                if key == "limit":
                    out.limit = number
                else:
                    out.offset = number
            elif key == "includefield":
                self._include(value, out)
            elif key in _BOOLEAN_PARAMS:
                if value.strip().lower() not in ("true", "false"):
                    raise HTTPError(400, f"{key} must be true or false, not {value!r}")
                if value.strip().lower() == "true":
                    out.warnings.append(
                        "The fuzzymatching parameter is not supported. Only literal matching"
                        " has been performed." if key == "fuzzymatching" else
                        f"The {key} parameter is not supported; it was not applied.")
            else:
                keyword = self._match_key(key, level)
                if keyword in seen:
                    raise HTTPError(400, f"query key {key} is given more than once")
                seen.add(keyword)
                if keyword in MATCHING:
                    out.conditions.append(Condition(keyword, value))
                    out.include.add(keyword)
                else:
                    unsupported.append(keyword)
        if unsupported:
            out.warnings.append("The following query keys are not supported and were not"
                                f" applied: {', '.join(unsupported)}")
        return out

    @staticmethod
    def _match_key(key: str, level: Level) -> str:
        parts = key.split(".")
        keywords = [keyword_of(p) for p in parts]
        if any(k is None for k in keywords):
            raise HTTPError(400, f"unknown query key {key!r}: not a DICOM attribute keyword"
                                 " or tag (PS3.6)")
        if len(parts) > 1:  # a sequence path: valid, not matched on
            return ".".join(k for k in keywords if k)
        keyword = keywords[0]
        assert keyword is not None
        own = MATCHING.get(keyword, (None,))[0] or _ATTRIBUTES.get(keyword, ("", "", None))[2]
        if own is not None and _RANK[own] > _RANK[level]:
            raise HTTPError(400, f"{keyword} is a {own}-level attribute: not a match key of"
                                 f" a {level} search")
        return keyword

    @staticmethod
    def _include(value: str, out: _Request) -> None:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            if name == "all":
                out.include_all = True
                continue
            keywords = [keyword_of(p) for p in name.split(".")]
            if any(k is None for k in keywords):
                raise HTTPError(400, f"unknown includefield {name!r}: not a DICOM attribute"
                                     " keyword or tag (PS3.6)")
            if len(keywords) == 1 and keywords[0] is not None:
                out.include.add(keywords[0])
            # a sequence path, or an attribute the node does not hold: nothing to add
            # (PS3.18 10.6.3.3: only attributes "supported by the origin server")

    @staticmethod
    def _returned(level: Level, parsed: _Request, all_studies: bool,
                  all_series: bool) -> list[str]:
        """The attributes each match carries: the level's defaults, those of the levels
        above when the URL does not name them (PS3.18 10.6.3.3.2/3), the match keys and
        includefields the node holds at or above the level."""
        names = list(_DEFAULTS[level])
        if level == "series" and all_studies or level == "instance" and all_studies:
            names += _DEFAULTS["study"]
        if level == "instance" and all_series:
            names += _DEFAULTS["series"]
        extra = set(parsed.include)
        if parsed.include_all:
            extra |= set(_ATTRIBUTES)
        for name in sorted(extra):
            spec = _ATTRIBUTES.get(name)
            if spec is not None and _RANK[spec[2]] <= _RANK[level] and not (
                    level != "study" and name in ("ModalitiesInStudy",
                                                  "NumberOfStudyRelatedSeries",
                                                  "NumberOfStudyRelatedInstances")) \
                    and not (level == "instance"
                             and name == "NumberOfSeriesRelatedInstances"):
                names.append(name)
        return list(dict.fromkeys(names))

    # -- the answer ----------------------------------------------------------------------

    @staticmethod
    def _json(row: dict[str, Any], wanted: list[str], level: Level,
              service: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in wanted:
            tag, vr, _ = _ATTRIBUTES[name]
            out[tag] = _value(vr, row.get(name))
        study = row.get("StudyInstanceUID", "")
        url = f"{service}/studies/{study}"
        if level != "study":
            url += f"/series/{row.get('SeriesInstanceUID', '')}"
        if level == "instance":
            url += f"/instances/{row.get('SOPInstanceUID', '')}"
        out["00081190"] = {"vr": "UR", "Value": [url]}
        out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        return dict(sorted(out.items()))


def _uint(key: str, value: str) -> int:
    v = value.strip()
    if not v.isdigit():
        raise HTTPError(400, f"{key} must be a non-negative integer, not {value!r}")
    return int(v)


def _value(vr: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON attribute (PS3.18 F.2); an empty value has no "Value"."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr == "PN":
        groups = str(value).split("=")
        name = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups,
                                     strict=False) if g}
        return {"vr": vr, "Value": [name]} if name else {"vr": vr}
    if vr in ("IS", "US"):
        return {"vr": vr, "Value": [int(value)]}
    if isinstance(value, list):
        return {"vr": vr, "Value": [str(v) for v in value]}
    return {"vr": vr, "Value": [str(value)]}
