"""What every encoder takes, and the deterministic UIDs of what it makes.

A result's UIDs are derived from the source study and series, the model's name
and version, the study revision and the kind of object: a retry or a re-run
makes the very same UIDs (so the PACS stores it once), while a new revision or
model version makes new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.core.manifest import Manifest

# Result object kinds a destination can ask for.
KINDS = ("seg", "sr", "gsps", "sc")


def derived_uid(*parts: object) -> str:
    """A UUID-derived UID (PS3.5 B.2, root 2.25) that is a pure function of ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True, eq=False)
class EncodeInput:
    """A prediction on one source series, ready to be encoded.

    ``labels[k]`` lies on the source instance ``source_paths[k]`` (the volume's
    slice order); its values are the manifest's label values, 0 = background.
    ``measurements`` maps a label name (or "total") to {quantity: (value, UCUM)}.
    """

    source_paths: tuple[Path, ...]
    labels: np.ndarray
    manifest: Manifest
    measurements: dict[str, dict[str, tuple[float, str]]]
    study_uid: str
    series_uid: str
    revision: int = 1
    device: str = "cpu"
    # UIDs of objects this revision replaces (from an earlier revision), per kind
    replaces: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def uid(self, kind: str, what: str = "instance") -> str:
        """Deterministic UID of this result's ``kind`` object (``what``: series/instance)."""
        m = self.manifest
        return derived_uid("dicomnode-result", self.study_uid, self.series_uid, m.name,
                           m.version, self.revision, kind, what)

    def previous_uid(self, kind: str, what: str, revision: int) -> str:
        m = self.manifest
        return derived_uid("dicomnode-result", self.study_uid, self.series_uid, m.name,
                           m.version, revision, kind, what)
