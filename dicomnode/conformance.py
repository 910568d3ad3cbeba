"""The tables of the DICOM Conformance Statement (``docs/conformance.md``), from the code.

PS3.2 asks a conformance statement to list every SOP class and transfer syntax an
implementation accepts and proposes. Here those lists are not typed by hand: each
generated block of ``docs/conformance.md`` (between ``<!-- BEGIN GENERATED: name -->``
and ``<!-- END GENERATED: name -->``) is rebuilt from what the code itself uses:

* ``scp-storage``: pynetdicom's storage SOP classes (``pynetdicom.sop_class``), which
  the C-STORE SCP accepts (with ``UNRESTRICTED_STORAGE_SERVICE``, private and unknown
  ones too), and Verification;
* ``transfer-syntaxes``: every transfer syntax pydicom knows, accepted as proposed and
  stored as received; whether the node can decode its pixel data for a model is asked
  of pydicom's decoders (``pydicom.pixels.get_decoder``) at generation time;
* ``scu``: the SOP classes and transfer syntaxes the result sender proposes, found by
  *encoding* one object of each kind (``dicomnode.encode``: SEG, SR, GSPS, SC, KOS) on a
  small synthetic series and asking the sender which syntaxes it proposes for it
  (``dicomnode.export.dimse._proposed_syntaxes``);
* ``created-objects``: the same encoded objects: SOP class, modality, transfer syntax;
* ``statuses``: the C-STORE statuses the SCP answers (``dicomnode.ingest.scp``);
* ``dicomweb``: the HTTP routes of the running app (``dicomnode.http.build_app``);
* ``configuration``: the networking settings of ``dicomnode.config`` with defaults.

``python -m dicomnode.conformance --write`` regenerates the blocks in place;
``--check`` exits 1 with a diff when the file and the code disagree (``tests/
test_conformance.py`` runs it). ``scripts/gen-conformance`` is the same as ``--write``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- END GENERATED: (?P=name) -->)", re.S)


def _uid_name(uid: str) -> str:
    import pydicom.uid

    return pydicom.uid.UID(uid).name or "(unnamed)"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


# -- the lists -------------------------------------------------------------------------------


def scp_storage() -> str:
    """Storage SOP classes accepted by the C-STORE SCP (and Verification)."""
    from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]

    rows = [(str(Verification), "Verification", "SCP")]  # pynetdicom's default syntaxes
    rows += sorted(((str(uid), _uid_name(str(uid)), "SCP")
                    for uid in set(_STORAGE_CLASSES.values())), key=lambda r: r[1].lower())
    text = _table(("SOP Class UID", "SOP Class Name", "Role"), rows)
    return text + (f"\n{len(rows) - 1} storage SOP classes named by pynetdicom; besides these,"
                   " any private or not yet published storage SOP class is accepted (SCP role,"
                   " unrestricted storage service).\n")


def transfer_syntaxes() -> str:
    """Every transfer syntax pydicom knows; accepted as proposed; decodable or not."""
    import pydicom.uid
    from pydicom.pixels import get_decoder

    rows = []
    for ts in pydicom.uid.AllTransferSyntaxes:
        try:
            decodable = get_decoder(ts).is_available
        except NotImplementedError:
            decodable = False
        rows.append((str(ts), ts.name, "yes", "yes" if decodable else "no (stored only)"))
    return _table(("Transfer Syntax UID", "Name", "Accepted (SCP)",
                   "Pixel data decoded for models"), rows)


def _sample_objects(folder: Path) -> dict[str, list[Path]]:
    """One of each result kind the encoders make, on a tiny synthetic series."""
    import pydicom

    from dicomnode.core.manifest import Code, Label, Manifest
    from dicomnode.encode.base import EncodeInput
    from dicomnode.encode.kos import ModelIdentity, RejectedInstance, encode_rejection_note
    from dicomnode.encode.objects import encode_objects
    from dicomnode.inference.volume import load_series
    from dicomnode.synthetic import make_ct_series

    label = Label(value=1, name="lung", category=Code(value="91723000", meaning="Anatomical Structure"),
                  type=Code(value="39607008", meaning="Lung"))
    manifest = Manifest(name="conformance", version="0", runtime="builtin", labels=(label,))
    paths = make_ct_series(folder / "ct", n_slices=3, rows=32, cols=32, seed=1)
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[:, 8:20, 8:20] = 1
    inp = EncodeInput(source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids),
                      labels=labels, manifest=manifest,
                      measurements={"lung": {"volume": (1.0, "ml")}},
                      study_uid=volume.study_uid, series_uid=volume.series_uid)
    objects = encode_objects(inp, ["seg", "sr", "gsps", "sc"], folder / "out")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for v in objects.values() for p in v]
    note = encode_rejection_note([RejectedInstance.from_dataset(h) for h in headers], headers[0],
                                 destination="conformance", identity=ModelIdentity("conformance", "0"))
    note_path = folder / "kos.dcm"
    note.save_as(note_path, enforce_file_format=True)
    objects["kos"] = [note_path]
    return objects


_KIND_TITLES = {"seg": "DICOM-SEG (segmentation)", "sr": "TID 1500 Measurement Report",
                "gsps": "GSPS contours (viewer fallback)",
                "sc": "Secondary Capture overlay (viewer fallback)",
                "kos": "Rejection note (IHE IOCM)"}


def _objects() -> list[tuple[str, str, str, str]]:
    """(kind, SOP class UID, transfer syntax UID, modality) of each encoded sample."""
    import pydicom

    with tempfile.TemporaryDirectory(prefix="dicomnode-conformance-") as tmp:
        out = []
        for kind, paths in _sample_objects(Path(tmp)).items():
            ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
            out.append((kind, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                        str(ds.Modality)))
        return out


_OBJECTS_CACHE: list[tuple[str, str, str, str]] = []


def _encoded() -> list[tuple[str, str, str, str]]:
    if not _OBJECTS_CACHE:
        _OBJECTS_CACHE.extend(_objects())
    return _OBJECTS_CACHE


def scu() -> str:
    """SOP classes and transfer syntaxes proposed when results are sent (C-STORE SCU)."""
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.export.dimse import _proposed_syntaxes

    rows = [(str(Verification), "Verification", "SCU",
             ", ".join(_uid_name(t) for t in DEFAULT_TRANSFER_SYNTAXES))]
    seen = set()
    for _kind, sop_class, ts, _modality in _encoded():
        if sop_class in seen:
            continue
        seen.add(sop_class)
        proposed = ", ".join(_uid_name(t) for t in _proposed_syntaxes(ts))
        rows.append((sop_class, _uid_name(sop_class), "SCU", proposed))
    return _table(("SOP Class UID", "SOP Class Name", "Role", "Transfer Syntaxes proposed"), rows)


def created_objects() -> str:
    rows = [(_KIND_TITLES[kind], _uid_name(sop_class), sop_class, modality, _uid_name(ts))
            for kind, sop_class, ts, modality in _encoded()]
    return _table(("Object", "SOP Class", "SOP Class UID", "Modality", "Transfer Syntax"), rows)


def statuses() -> str:
    """The statuses the doors answer (dicomnode.ingest.admission.ANSWERS); a status the
    doors' code uses that the table does not describe stops the generator."""
    import re

    from dicomnode.ingest import admission, scp, stow

    used = set()
    for module in (admission, scp, stow):
        used |= set(re.findall(r"Status\.([A-Z_]+)", Path(module.__file__ or "").read_text()))
    answered = {status.name for status in admission.ANSWERS}
    for name in sorted(used - answered):
        raise RuntimeError(f"C-STORE status {name} answered by dicomnode.ingest is not"
                           " described in dicomnode.ingest.admission.ANSWERS")
    rows = [(f"0x{int(status):04X}", status.name.replace("_", " ").title(), when)
            for status, when in admission.ANSWERS.items()]
    return _table(("Status", "Meaning", "When"), sorted(rows))


# path pattern, method -> (service, request media types, response media types)
_WEB = {
    ("/healthz", "GET"): ("liveness probe", "-", "application/json"),
    ("/readyz", "GET"): ("readiness probe (storage writable, databases, scheduler)", "-",
                         "application/json"),
    ("/metrics", "GET"): ("Prometheus metrics", "-", "text/plain; version=0.0.4"),
    ("/dicom-web/studies", "POST"): ("STOW-RS Store Instances",
                                     'multipart/related; type="application/dicom"',
                                     "application/dicom+json"),
    ("/dicom-web/studies/{study}", "POST"): ("STOW-RS Store Instances (into one study)",
                                             'multipart/related; type="application/dicom"',
                                             "application/dicom+json"),
    ("/dicom-web/studies", "GET"): ("QIDO-RS Search for Studies", "-", "application/dicom+json"),
    ("/dicom-web/series", "GET"): ("QIDO-RS Search for Series", "-", "application/dicom+json"),
    ("/dicom-web/instances", "GET"): ("QIDO-RS Search for Instances", "-",
                                      "application/dicom+json"),
    ("/dicom-web/studies/{study}/series", "GET"): ("QIDO-RS Search for Series", "-",
                                                   "application/dicom+json"),
    ("/dicom-web/studies/{study}/instances", "GET"): ("QIDO-RS Search for Instances", "-",
                                                      "application/dicom+json"),
    ("/dicom-web/studies/{study}/series/{series}/instances", "GET"): (
        "QIDO-RS Search for Instances", "-", "application/dicom+json"),
    ("/dicom-web/studies/{study}", "GET"): ("WADO-RS Retrieve Study", "-",
                                            'multipart/related; type="application/dicom"'),
    ("/dicom-web/studies/{study}/series/{series}", "GET"): (
        "WADO-RS Retrieve Series", "-", 'multipart/related; type="application/dicom"'),
    ("/dicom-web/studies/{study}/series/{series}/instances/{sop}", "GET"): (
        "WADO-RS Retrieve Instance", "-", 'multipart/related; type="application/dicom"'),
    ("/dicom-web/studies/{study}/metadata", "GET"): ("WADO-RS Retrieve Study Metadata", "-",
                                                     "application/dicom+json"),
    ("/dicom-web/studies/{study}/series/{series}/metadata", "GET"): (
        "WADO-RS Retrieve Series Metadata", "-", "application/dicom+json"),
    ("/dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata", "GET"): (
        "WADO-RS Retrieve Instance Metadata", "-", "application/dicom+json"),
    ("/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", "GET"): (
        "WADO-RS Retrieve Frames", "-", 'multipart/related; type="application/octet-stream"'),
    ("/dicom-web/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}", "GET"): (
        "WADO-RS Retrieve Bulkdata", "-", 'multipart/related; type="application/octet-stream"'),
    ("/", "GET"): ("status page (studies, jobs, deliveries, results)", "-", "text/html"),
    ("/status/jobs/{job_id:int}/overlay.png", "GET"): (
        "status page: a result's contours over its source slice", "-", "image/png"),
    ("/login", "GET"): ("sign-in page (browsers; with http.tokens)", "-", "text/html"),
    ("/login", "POST"): ("sign in with a token: a session cookie for reads",
                         "application/x-www-form-urlencoded", "text/html"),
    ("/logout", "POST"): ("sign out", "-", "text/html"),
    ("/viewer", "GET"): ("OHIF viewer (redirects to /viewer/)", "-", "text/html"),
    ("/viewer/{path:path}", "GET"): (
        "OHIF 3.13 viewer: its files, and the app-config.js the node writes (its DICOMweb"
        " root); without the build, how to install it", "-", "text/html, application/javascript"),
    ("/workers/v1/heartbeat", "POST"): (
        "worker API (queue.backend celery, worker tokens): a worker's heartbeat",
        "application/json", "application/json"),
    ("/workers/v1/jobs/{job:int}/claim", "POST"): (
        "worker API: claim a job handed out by the broker", "application/json",
        "application/json"),
    ("/workers/v1/jobs/{job:int}/extend", "POST"): (
        "worker API: extend the lease of a claimed job", "application/json",
        "application/json"),
    ("/workers/v1/jobs/{job:int}/fail", "POST"): (
        "worker API: report a job the worker cannot run", "application/json",
        "application/json"),
    ("/workers/v1/jobs/{job:int}/input", "GET"): (
        "worker API: the job's volume and geometry, no patient identity", "-",
        "application/octet-stream"),
    ("/workers/v1/jobs/{job:int}/result", "PUT"): (
        "worker API: hand back labels and measurements", "application/octet-stream",
        "application/json"),
    **{(f"/dicom-web/studies/{{study}}{level}/{kind}", "GET"): (
        f"WADO-RS Retrieve {what} {kind.title()}", "-",
        "image/jpeg, image/png" + (" (multipart/related for several)"
                                   if kind == "rendered" and what != "Frames" else ""))
       for level, what in (("", "Study"), ("/series/{series}", "Series"),
                           ("/series/{series}/instances/{sop}", "Instance"),
                           ("/series/{series}/instances/{sop}/frames/{frames}", "Frames"))
       for kind in ("rendered", "thumbnail")},
}


def _routes() -> Iterator[tuple[str, str]]:
    from dicomnode.config import NodeConfig
    from dicomnode.core.index import Index
    from dicomnode.http import build_app
    from dicomnode.ingest.spool import Spool
    from dicomnode.metrics import Metrics

    def inner_routes(app: Any) -> list[Any] | None:
        """The routes behind a mounted app, through its middleware."""
        for _ in range(8):
            if app is None:
                return None
            if getattr(app, "routes", None) is not None:
                return list(app.routes)
            app = getattr(app, "app", None)
        return None

    def walk(routes: list[Any], prefix: str) -> Iterator[tuple[str, str]]:
        for r in routes:
            inner = inner_routes(getattr(r, "app", None))
            if getattr(r, "methods", None) is None and inner is not None:
                yield from walk(inner, prefix + r.path)
            else:
                for method in sorted(set(r.methods or ()) - {"HEAD"}):
                    yield prefix + r.path, method

    from dicomnode.web.worker_api import make_worker_api

    with tempfile.TemporaryDirectory(prefix="dicomnode-conformance-") as tmp:
        index = Index(Path(tmp) / "index.sqlite3")
        try:
            # the viewer's routes as they are without its build (the same paths with it),
            # and the worker API that a celery queue mounts
            config = NodeConfig.model_validate(
                {"storage": tmp, "http": {"viewer_dir": str(Path(tmp) / "no-viewer")}})
            app = build_app(config, Spool(Path(tmp)), index, Metrics(), [], lambda: None,
                            workers=make_worker_api(None, []))  # type: ignore[arg-type]
            yield from walk(list(app.routes), "")
        finally:
            index.close()


def dicomweb() -> str:
    rows = []
    for path, method in _routes():
        if (path, method) not in _WEB:
            raise RuntimeError(f"HTTP route {method} {path} is not described in"
                               " dicomnode.conformance (_WEB)")
        service, request, response = _WEB[(path, method)]
        rows.append((f"`{method} {path}`", service, request, response))
    return _table(("Route", "Service (PS3.18)", "Request media type", "Response media type"),
                  rows)


def qido() -> str:
    """The QIDO-RS match keys and the matching each gets (dicomnode.core.search)."""
    from dicomnode.core.search import MATCHING

    how = {
        "uid": "UID list (`,` or `\\` separated)",
        "text": "single value or wild card (`*`, `?`), case-sensitive",
        "text_ci": "single value or wild card, case-insensitive",
        "pn": "single value or wild card, case-insensitive, trailing `^` ignored; alphabetic"
              " group or whole name",
        "date": "single date or range (`A-B`, `-B`, `A-`), YYYYMMDD",
        "time": "single time or range; partial times cover their period",
        "int": "single value (integer)",
        "cs_list": "single value, wild card or list (`,` or `\\`)",
        "modalities": "any series of the study has one of the listed modalities",
    }
    rows = [(f"`{keyword}`", level, how[kind]) for keyword, (level, _, kind)
            in MATCHING.items()]
    return _table(("Match key", "Level", "Matching (PS3.4 C.2.2.2)"), rows)


# meanings of settings whose schema field carries no description
_MEANINGS = {
    "ae_title": "AE title of STORE-SCP (called) and RESULT-SCU (calling)",
    "port": "DIMSE port of STORE-SCP",
    "destinations": "where results go (C-STORE or STOW-RS), see below",
    "ingest.acse_timeout": "seconds to wait for association messages",
    "ingest.dimse_timeout": "seconds to wait for DIMSE messages",
    "ingest.network_timeout": "seconds of network silence before the association is dropped",
    "http.enabled": "serve DICOMweb, the status page, /healthz, /readyz, /metrics",
    "http.bind_address": "HTTP address (loopback by default)",
    "http.keyfile": "private key of http.certfile",
    "http.require_client_cert": "HTTPS clients must present a certificate of http.ca_file",
    "http.max_request_mb": "largest STOW-RS request, MiB",
    "http.max_part_mb": "largest STOW-RS part (instance), MiB",
}


def configuration() -> str:
    from pydantic import BaseModel

    from dicomnode.config import HttpConfig, IngestConfig, NodeConfig, TlsConfig

    rows: list[tuple[str, str, str]] = []

    def add(model: type[BaseModel], prefix: str, names: tuple[str, ...] | None = None) -> None:
        for name, info in model.model_fields.items():
            if names is not None and name not in names:
                continue
            if isinstance(info.default, BaseModel) or name in ("tls",):
                continue
            default = "(required)" if info.is_required() else repr(info.default)
            meaning = info.description or _MEANINGS.get(prefix + name, "")
            rows.append((f"`{prefix}{name}`", default.replace("|", "\\|"),
                         meaning.replace("|", "\\|")))

    add(NodeConfig, "", ("ae_title", "bind_address", "port", "allowed_callers",
                         "accept_any_caller", "destinations"))
    add(IngestConfig, "ingest.")
    add(TlsConfig, "ingest.tls.")
    add(HttpConfig, "http.", ("enabled", "bind_address", "port", "tokens", "metrics_tokens",
                              "allow_unauthenticated", "allowed_hosts", "certfile", "keyfile",
                              "ca_file", "require_client_cert", "max_request_mb", "max_part_mb",
                              "header_timeout_seconds", "body_timeout_seconds",
                              "max_connections"))
    return _table(("Setting", "Default", "Meaning"), rows)


def implementation() -> str:
    from dicomnode import __version__
    from dicomnode.ingest import scp

    return _table(("Item", "Value"), [
        ("Product version", f"dicomnode {__version__}"),
        ("Implementation Class UID", scp.IMPLEMENTATION_CLASS_UID),
        ("Implementation Version Name", scp.IMPLEMENTATION_VERSION_NAME),
    ])


BLOCKS: dict[str, Callable[[], str]] = {
    "implementation": implementation,
    "scp-storage": scp_storage,
    "transfer-syntaxes": transfer_syntaxes,
    "scu": scu,
    "created-objects": created_objects,
    "statuses": statuses,
    "dicomweb": dicomweb,
    "qido": qido,
    "configuration": configuration,
}


# -- the document ----------------------------------------------------------------------------


def regenerate(text: str) -> str:
    """``text`` with every generated block rebuilt; every block must be present once."""
    found = [m.group("name") for m in _BLOCK.finditer(text)]
    missing = sorted(set(BLOCKS) - set(found))
    unknown = sorted(set(found) - set(BLOCKS))
    dupes = sorted({n for n in found if found.count(n) > 1})
    if missing or unknown or dupes:
        raise ValueError(f"generated blocks: missing {missing}, unknown {unknown},"
                         f" duplicated {dupes}")
    return _BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group("name")]() + m.group(4), text)


def diff(path: Path = DOC) -> list[str]:
    """The unified diff between the statement and what the code says (empty: they agree)."""
    text = path.read_text(encoding="utf-8")
    return list(difflib.unified_diff(text.splitlines(keepends=True),
                                     regenerate(text).splitlines(keepends=True),
                                     fromfile=str(path), tofile="generated from the code"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dicomnode.conformance",
                                description="regenerate or check the conformance statement's tables")
    p.add_argument("--file", type=Path, default=DOC)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="rewrite the generated blocks")
    group.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = p.parse_args(argv)
    if args.write:
        text = args.file.read_text(encoding="utf-8")
        args.file.write_text(regenerate(text), encoding="utf-8")
        print(f"{args.file}: generated blocks rewritten")
        return 0
    lines = diff(args.file)
    if lines:
        sys.stdout.writelines(lines)
        print(f"\n{args.file} disagrees with the code: run scripts/gen-conformance", file=sys.stderr)
        return 1
    print(f"{args.file}: agrees with the code")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
