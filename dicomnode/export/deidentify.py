"""De-identified forwarding: PS3.15 Annex E applied per destination, just before sending.

A destination marked off-site (``deidentify: true``, ``deidentify_profile: basic``,
``deidentify_options``) receives every instance and result de-identified by the
**Basic Application Level Confidentiality Profile** (PS3.15 E.2), optionally with the
**Retain Longitudinal Temporal Information with Modified Dates** (E.3.6) and **Clean
Descriptors** (E.3.5) options. The original files are never changed: the sender of that
destination (:class:`DeidentifyingSender`, wrapped around the usual one by
:func:`deidentifying_sender_factory`) writes a de-identified copy of each file, sends
it, and deletes it.

**Which attributes, and what happens to them**, is Table E.1-1 as tabulated by the
``dicom-anonymizer`` package (Kitware, BSD-3-Clause; its ``dicomfields_2026c`` table,
generated from the 2026c standard: about 650 attributes and repeating groups, each with
its action code). Its engine is not used: it touches top-level attributes only (a
Patient's Name inside a sequence would leave), replaces UIDs with random ones held in a
process-wide dict (not consistent across restarts or between a CT and the SEG sent a
day later) and writes "ANONYMIZED" for names (no consistent pseudonym). Here, at every
depth of the data set:

* private attributes (odd groups) are removed (E.1-1: private attributes X);
* **X** removed; **Z** emptied; **D** replaced by a dummy of the VR; **U** replaced
  by the destination's consistent pseudonym UID (:mod:`dicomnode.export.pseudonyms`);
  compound codes keep the IOD valid without knowing it: X/Z -> Z, X/D, Z/D, X/Z/D -> D,
  X/Z/U* -> U for UIDs and, for the Referenced/Source Image Sequences, the sequence is
  kept and its UIDs replaced;
* a D on a sequence (Content Sequence, Graphic Annotation Sequence, ...) keeps the
  structure and cleans it item by item (a dummy sequence would break SR and GSPS);
* Patient's Name and Patient ID become the patient's pseudonym (a non-empty Z is a
  permitted dummy), so that a destination sees one consistent pseudonymous patient;
* stricter than the table: a Text Value (0040,A160) inside a Content Sequence is kept
  only in objects this node made and only when it holds none of the instance's
  identifying values; otherwise it becomes ``REMOVED``; free text the table replaces
  in the node's own results (GSPS labels) is kept under the same test;
* the Modified Dates option shifts every date of the table (except the birth date)
  back by the patient's offset (whole days, so times stay) and sets Longitudinal
  Temporal Information Modified (0028,0303) MODIFIED; without it, REMOVED;
* Clean Descriptors keeps the descriptions listed in :data:`DESCRIPTORS` when they hold
  no identifying value of the instance (its names, IDs, institution, dates) and no
  date- or number-like text; others are treated as in the Basic Profile;
* Patient Identity Removed (0012,0062) YES, De-identification Method (0012,0063) and
  the Method Code Sequence (0012,0064, CID 7050) say what was done.

**Refused** (nothing is sent; the delivery fails permanently with the reason in the
outbox, other destinations are unaffected): Burned In Annotation YES unless
``allow_burned_in``; images of modalities that usually carry burned-in text (US, XC,
ES, OT, secondary capture) that do not say Burned In Annotation NO; encapsulated
documents (their content cannot be cleaned).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.config import DeidentifyOptions, Destination
from dicomnode.export.base import DeliveryOutcome, Sender
from dicomnode.export.pseudonyms import Keys, Pseudonymizer, PseudonymStore
from dicomnode.export.senders import make_sender

LOG = logging.getLogger(__name__)

TABLE_VERSION = "dicomfields_2026c"
_CATEGORY_CODES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
                   "Z_D_TAGS": "ZD", "X_Z_TAGS": "XZ", "X_D_TAGS": "XD", "X_Z_D_TAGS": "XZD",
                   "X_Z_U_STAR_TAGS": "XZU"}

PATIENT_NAME, PATIENT_ID, BIRTH_DATE = 0x00100010, 0x00100020, 0x00100030
TEXT_VALUE, CONTENT_SEQUENCE = 0x0040A160, 0x0040A730
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"LO", "LT", "ST", "UT", "SH", "UC"})
#: Descriptions the Clean Descriptors option may keep (PS3.15 E.3.5, "Clean Desc." column).
DESCRIPTORS = frozenset({
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments",
    "DerivationDescription", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription",
    "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
})
# VRs of identifiers (names, IDs, places, dates): the words a clean text must not hold
_IDENTIFIER_VRS = frozenset({"PN", "LO", "SH", "AE", "DA", "DT", "UC", "UR"})
_BURNED_IN_MODALITIES = frozenset({"US", "XC", "ES", "OT", "GM"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_ENCAPSULATED = "1.2.840.10008.5.1.4.1.1.104."
_NODE_RESULTS = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.59",
})

# CID 7050 De-identification Method
_METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal"
                                           " Information Modified Dates Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}


class DeidentificationRefused(Exception):
    """This object must not go to a de-identified destination (the reason says why)."""


@dataclass(frozen=True)
class ActionTable:
    """E.1-1: action code by tag, and the repeating groups (group, element, masks, code)."""

    exact: dict[int, str]
    masked: tuple[tuple[int, int, int, int, str], ...]
    version: str

    def action(self, tag: int) -> str | None:
        code = self.exact.get(tag)
        if code is not None:
            return code
        group, element = tag >> 16, tag & 0xFFFF
        for g, e, gm, em, c in self.masked:
            if group & gm == g & gm and element & em == e & em:
                return c
        return None


_TABLE: ActionTable | None = None


def action_table() -> ActionTable:
    """PS3.15 Table E.1-1 from dicom-anonymizer (loaded once)."""
    global _TABLE
    if _TABLE is None:
        from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

        tables = dicom_anonymization_database_selector(TABLE_VERSION)
        exact: dict[int, str] = {}
        masked = []
        for category, code in _CATEGORY_CODES.items():
            for entry in tables[category]:
                if len(entry) == 2:
                    exact[(entry[0] << 16) | entry[1]] = code
                else:
                    masked.append((entry[0], entry[1], entry[2], entry[3], code))
        _TABLE = ActionTable(exact, tuple(masked), TABLE_VERSION)
    return _TABLE


_DUMMY: dict[str, Any] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "PN": "ANONYMOUS",
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DS": "0", "IS": "0",
    "UR": "http://anonymized.invalid", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0,
    "US": 0, "SV": 0, "UV": 0, "OB": b"", "OW": b"", "OD": b"", "OF": b"", "OL": b"",
    "OV": b"", "UN": b"",
}
_DATE_LIKE = re.compile(r"\d{8}|\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|\d{6,}")


def _tokens(ds: Dataset, table: ActionTable) -> set[str]:
    """Identifying values of ``ds`` (names, IDs, places and dates the table acts on, at any
    depth; not the descriptions themselves), as lower-case words of 3+ characters and
    whole values: what a clean text must not hold."""
    out: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            if elem.tag.is_private or table.action(int(elem.tag)) is None:
                continue
            if elem.VR not in _IDENTIFIER_VRS or elem.value in (None, ""):
                continue
            keyword = elem.keyword
            if keyword in DESCRIPTORS or keyword.endswith(("Description", "Comments")):
                continue  # the texts being judged, not identifiers
            values = elem.value if isinstance(elem.value, list | tuple) or (
                hasattr(elem.value, "__iter__") and not isinstance(elem.value, str | bytes)
                and elem.VR != "PN") else [elem.value]
            for v in values:
                text = str(v).strip().lower()
                if len(text) >= 3:
                    out.add(text)
                out.update(w for w in re.split(r"[\^\s,.;:/\\=()-]+", text) if len(w) >= 3)

    visit(ds)
    return out


def is_clean(text: str, tokens: set[str]) -> bool:
    """Whether ``text`` holds no identifying token and nothing date- or number-like."""
    low = text.lower()
    if _DATE_LIKE.search(low):
        return False
    words = set(re.split(r"[\^\s,.;:/\\=()-]+", low))
    return not any(t in words or (" " in t and t in low) for t in tokens)


@dataclass
class _Run:
    """The state of one data set's de-identification."""

    pseudo: Pseudonymizer
    options: DeidentifyOptions
    tokens: set[str]
    node_made: bool
    patient: str
    offset: int
    issued: list[tuple[str, str, str]] = field(default_factory=list)


class Deidentifier:
    """De-identifies data sets for one destination (see the module docstring)."""

    def __init__(self, destination: Destination, store: PseudonymStore) -> None:
        if not destination.deidentify:
            raise ValueError(f"destination {destination.name}: not marked deidentify")
        self.destination = destination.name
        self.options = destination.deidentify_options
        self.profile = destination.deidentify_profile
        self.store = store
        self.table = action_table()
        self.pseudo = Pseudonymizer(store.secret(destination.name))

    # -- refusal ------------------------------------------------------------------------

    def refusal(self, ds: Dataset) -> str | None:
        """Why ``ds`` must not be sent here, or None."""
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class.startswith(_ENCAPSULATED):
            return "an encapsulated document cannot be de-identified"
        if self.options.allow_burned_in:
            return None
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned == "YES":
            return "Burned In Annotation is YES (identifying text may be in the pixels)"
        modality = str(ds.get("Modality", "") or "").upper()
        risky = modality in _BURNED_IN_MODALITIES or sop_class.startswith(_SECONDARY_CAPTURE)
        if risky and burned != "NO" and "PixelData" in ds:
            return (f"a {modality or 'secondary capture'} image that does not say Burned In"
                    " Annotation NO (such images often carry identifying text)")
        return None

    # -- the transform ------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its File Meta Information); returns it.

        Raises :class:`DeidentificationRefused` when it must not be sent here.
        """
        reason = self.refusal(ds)
        if reason is not None:
            raise DeidentificationRefused(reason)
        # keyed on the Patient ID alone: results copy it but not the Issuer of Patient ID,
        # and a source and its results must get the same pseudonym and date offset
        patient_id = str(ds.get("PatientID", "") or "")
        node_made = (str(ds.get("Manufacturer", "")) == "dicomnode"
                     and str(ds.get("SOPClassUID", "")) in _NODE_RESULTS)
        run = _Run(self.pseudo, self.options, _tokens(ds, self.table), node_made,
                   self.pseudo.patient(patient_id), self.pseudo.date_offset_days(patient_id))
        run.issued.append(("patient", run.patient, patient_id))
        self._walk(ds, run, in_structure=False)
        self._mark(ds, run)
        self._file_meta(ds)
        self.store.remember(self.destination, [(k, p, o) for k, p, o in run.issued])  # type: ignore[misc]
        return ds

    def _walk(self, ds: Dataset, run: _Run, *, in_structure: bool) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            code = self.table.action(tag)
            if tag == TEXT_VALUE and in_structure and code is None:
                code = "CLEAN_TEXT"
            if code is None:
                if elem.VR == "SQ":
                    for item in elem.value or ():
                        self._walk(item, run, in_structure=in_structure)
                continue
            self._apply(ds, elem, code, run, in_structure)

    def _apply(self, ds: Dataset, elem: DataElement, code: str, run: _Run,
               in_structure: bool) -> None:
        tag, vr = int(elem.tag), elem.VR
        keyword = elem.keyword
        if vr == "SQ":
            if code in ("X",):
                del ds[elem.tag]
            elif code in ("Z", "XZ"):
                elem.value = DicomSequence([])
            else:  # D (structure kept, cleaned), U, XZU (UIDs inside replaced)
                inner = in_structure or code == "D" or tag == CONTENT_SEQUENCE
                for item in elem.value or ():
                    self._walk(item, run, in_structure=inner)
            return
        if tag in (PATIENT_NAME, PATIENT_ID):
            elem.value = run.patient
            return
        if code == "CLEAN_TEXT":
            if not (run.node_made and elem.value and is_clean(str(elem.value), run.tokens)):
                elem.value = "REMOVED"
            return
        if self.options.retain_longitudinal_modified_dates and vr in _DATE_VRS \
                and tag != BIRTH_DATE:
            if elem.value not in (None, ""):
                elem.value = _shift(elem.value, vr, run.offset)
            return
        if self.options.clean_descriptors and keyword in DESCRIPTORS:
            if elem.value not in (None, "") and is_clean(str(elem.value), run.tokens):
                return
        if code == "U" or (code == "XZU" and vr == "UI"):
            self._uid(elem, run)
            return
        if code == "X":
            del ds[elem.tag]
        elif code in ("Z", "XZ", "XZU"):
            elem.value = b"" if vr.startswith("O") or vr == "UN" else None
        else:  # D, ZD, XD, XZD
            if vr in _TEXT_VRS and run.node_made and in_structure and elem.value and \
                    is_clean(str(elem.value), run.tokens):
                return  # the node's own labels in its GSPS / SR structure
            if vr == "UI":
                self._uid(elem, run)
            else:
                elem.value = _DUMMY.get(vr, "ANONYMIZED")

    def _uid(self, elem: DataElement, run: _Run) -> None:
        values = elem.value if isinstance(elem.value, list | tuple) or (
            elem.VM > 1) else [elem.value]
        new: list[str] = []
        for v in values:
            v = str(v).strip()
            if not v:
                new.append(v)
                continue
            p = run.pseudo.uid(v)
            run.issued.append(("uid", p, v))
            new.append(p)
        elem.value = new if len(new) > 1 else (new[0] if new else "")

    def _mark(self, ds: Dataset, run: _Run) -> None:
        ds.PatientIdentityRemoved = "YES"
        chosen = ["basic"] + [k for k in ("retain_longitudinal_modified_dates",
                                          "clean_descriptors") if getattr(self.options, k)]
        ds.DeidentificationMethod = [f"dicomnode PS3.15 E.1-1 ({self.table.version})",
                                     *(_METHOD_CODES[n][1][:64] for n in chosen)]
        items = []
        for name in chosen:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = _METHOD_CODES[name]
            item.CodingSchemeDesignator = "DCM"
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.options.retain_longitudinal_modified_dates else "REMOVED")

    @staticmethod
    def _file_meta(ds: Dataset) -> None:
        old = getattr(ds, "file_meta", None)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = (old.TransferSyntaxUID if old is not None and
                                  "TransferSyntaxUID" in old else pydicom.uid.ExplicitVRLittleEndian)
        ds.file_meta = meta

    def file(self, source: Path, target: Path) -> Path:
        """Write a de-identified copy of ``source`` to ``target`` (same transfer syntax)."""
        ds = pydicom.dcmread(source)
        self.deidentify(ds)
        ds.save_as(target, enforce_file_format=True)
        return target

    def original_uid(self, pseudonym: str) -> str | None:
        """The source UID behind a UID this destination was given (e.g. the study of a
        result that comes back from it), or None."""
        return self.store.original(self.destination, "uid", pseudonym)


def _shift(value: Any, vr: str, days: int) -> Any:
    """A DA / DT value moved ``days`` back (TM unchanged); unparsable values are emptied."""
    if vr == "TM":
        return value
    values = list(value) if isinstance(value, list | tuple) or (
        hasattr(value, "__iter__") and not isinstance(value, str)) else [value]
    out = []
    for v in values:
        text = str(v).strip()
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            out.append("")
            continue
        out.append((day - dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:])
    return out if len(out) > 1 else out[0]


class DeidentifyingSender(Sender):
    """Sends de-identified copies through ``inner``; refusals are permanent failures."""

    def __init__(self, inner: Sender, deidentifier: Deidentifier, workdir: Path) -> None:
        self.inner = inner
        self.deidentifier = deidentifier
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.label = f"{inner.label} (de-identified)"

    def send(self, files: list[Path]) -> list[DeliveryOutcome]:
        outcomes: list[DeliveryOutcome | None] = [None] * len(files)
        copies: list[tuple[int, Path]] = []
        batch = Path(tempfile.mkdtemp(prefix="batch-", dir=self.workdir))
        try:
            for i, path in enumerate(files):
                target = batch / f"{uuid.uuid4().hex}.dcm"
                try:
                    self.deidentifier.file(Path(path), target)
                except DeidentificationRefused as exc:
                    LOG.warning("not sent to %s: refused for a de-identified destination: %s",
                                self.deidentifier.destination, exc)
                    outcomes[i] = DeliveryOutcome.permanent(
                        Path(path), f"refused for de-identified destination: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - nothing uncleaned may leave
                    LOG.exception("cannot de-identify a file for %s", self.deidentifier.destination)
                    outcomes[i] = DeliveryOutcome.permanent(
                        Path(path), f"cannot de-identify: {type(exc).__name__}")
                    continue
                copies.append((i, target))
            if copies:
                sent = self.inner.send([c for _, c in copies])
                for (i, _), outcome in zip(copies, sent, strict=True):
                    outcomes[i] = DeliveryOutcome(Path(files[i]), outcome.result, outcome.reason,
                                                  outcome.status)
        finally:
            for child in batch.iterdir():
                child.unlink(missing_ok=True)
            os.rmdir(batch)
        return [o for o in outcomes if o is not None]

    def close(self) -> None:
        self.inner.close()


SenderFactory = Callable[[Destination, str], Sender]


def deidentifying_sender_factory(storage: Path | str, keys: Keys,
                                 base: Callable[..., Sender] = make_sender) -> SenderFactory:
    """The dispatcher's ``sender_factory``: plain senders for ordinary destinations, a
    :class:`DeidentifyingSender` for those marked ``deidentify``. ``keys``: the node's
    keyring (:func:`dicomnode.audit.setup.open_keyring`)."""
    store: list[PseudonymStore] = []

    def factory(destination: Destination, calling_ae: str) -> Sender:
        if not destination.deidentify:
            return base(destination, calling_ae)
        if not store:
            store.append(PseudonymStore(storage, keys))
        plain = destination.model_copy(update={"deidentify": False})
        return DeidentifyingSender(base(plain, calling_ae), Deidentifier(destination, store[0]),
                                   Path(storage) / "deidentify" / "outgoing")

    return factory


def uids_in(ds: Dataset) -> Iterable[str]:
    """Every UID value in ``ds`` at any depth (for tests and checks)."""
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            yield from (str(v) for v in values)
