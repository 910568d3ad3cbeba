"""Which frames a ``/rendered`` or ``/thumbnail`` request shows (PS3.18 10.4.1.1.3-4).

* an instance's ``/rendered``: each frame (a multipart answer for a multi-frame
  instance); ``/frames/{list}/rendered``: those frames;
* a series' or study's ``/rendered``: the first frame of each image instance, in
  arrival order, at most :data:`MAX_IMAGES` (else 413: ask per instance);
* a ``/thumbnail``: one image: for a study, its largest acquired image series (SEG, SR,
  presentation states and key object notes are not representative); for a series, its
  middle instance by Instance Number; for an instance, its middle frame.

The images themselves are made by :func:`dicomnode.web.render.render`.
"""

from __future__ import annotations

from typing import Any

from dicomnode.core.dicomweb import HTTPError
from dicomnode.core.index import Index
from dicomnode.core.search import Condition, Search
from dicomnode.web.render import RenderOptions, render
from dicomnode.web.wado import Wado

MAX_IMAGES = 500
#: SOP classes (prefixes) that carry no image: SR, KOS, presentation states, ...
_NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
               "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.481.3",
               "1.2.840.10008.5.1.4.1.1.9.")
_NOT_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.66.1",
                      "1.2.840.10008.5.1.4.1.1.66.2", "1.2.840.10008.5.1.4.1.1.66.3"}
_DERIVED = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG"}


class Renderings:
    """Renders what one request names, from the index and the stored files."""

    def __init__(self, index: Index, wado: Wado) -> None:
        self.index = index
        self.wado = wado

    def render(self, study: str, series: str | None, sop: str | None,
               frames: list[int] | None, opts: RenderOptions, thumbnail: bool
               ) -> list[bytes]:
        if sop is not None:
            row = self.wado.instance_rows(study, series, sop)[0]
            path = self.wado.path(row)
            if frames is None:
                n = self._frames(row.sop_instance_uid, study, series)
                frames = [(n + 1) // 2] if thumbnail else list(range(1, n + 1))
            if thumbnail:
                frames = frames[:1]
            if len(frames) > MAX_IMAGES:
                raise HTTPError(413, f"at most {MAX_IMAGES} frames are rendered at once")
            return [render(path, k, opts) for k in frames]
        rows = self._images(study, series)
        if not rows:
            if not self.index.instances(study_uid=study, series_uid=series):
                raise HTTPError(404, "not found")
            raise HTTPError(406, "nothing here has pixel data: there is no image rendering")
        if thumbnail:
            chosen = self._representative(rows, series is None)
            n = int(chosen.get("NumberOfFrames") or 1)
            path = self.wado.path(self.wado.instance_rows(
                study, chosen["SeriesInstanceUID"], chosen["SOPInstanceUID"])[0])
            return [render(path, (n + 1) // 2, opts)]
        if len(rows) > MAX_IMAGES:
            raise HTTPError(413, f"{len(rows)} images: at most {MAX_IMAGES} are rendered at"
                                 " once; ask for each series or instance")
        out = []
        for r in rows:
            path = self.wado.path(self.wado.instance_rows(
                study, r["SeriesInstanceUID"], r["SOPInstanceUID"])[0])
            out.append(render(path, 1, opts))
        return out

    def _frames(self, sop: str, study: str, series: str | None) -> int:
        rows, _ = self.index.search(Search("instance", (Condition("SOPInstanceUID", sop),),
                                           study, series), 1)
        return int(rows[0].get("NumberOfFrames") or 1) if rows else 1

    def _images(self, study: str, series: str | None) -> list[dict[str, Any]]:
        """The instances with pixel data (by what the index knows of them)."""
        rows, _ = self.index.search(Search("instance", study_uid=study, series_uid=series),
                                    1 << 20)
        return [r for r in rows if not str(r["SOPClassUID"]).startswith(_NOT_IMAGES)
                and r["SOPClassUID"] not in _NOT_IMAGE_CLASSES
                and (r.get("Rows") or r.get("Rows") is None)]

    @staticmethod
    def _representative(rows: list[dict[str, Any]], whole_study: bool) -> dict[str, Any]:
        if whole_study:
            by_series: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by_series.setdefault(r["SeriesInstanceUID"], []).append(r)
            acquired = {k: v for k, v in by_series.items()
                        if str(v[0].get("Modality") or "") not in _DERIVED} or by_series
            rows = max(acquired.values(), key=len)
        ordered = sorted(rows, key=lambda r: (r.get("InstanceNumber") is None,
                                              r.get("InstanceNumber") or 0))
        return ordered[(len(ordered) - 1) // 2]
