"""Typed, validated, frozen service configuration.

One YAML file configures the whole node. Every field has an embedded default, so
the node starts with no file at all. The config is loaded once (``load_config``)
and passed down as an argument; nothing reads it from a global.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# the DIMSE door's settings live in their own module; they are part of this schema
from dicomnode.config_ingest import IngestConfig as IngestConfig
from dicomnode.config_ingest import TlsConfig as TlsConfig
from dicomnode.core.uids import is_uid
from dicomnode.errors import ConfigError

SENDER = "@sender"  # in a rule's destinations: the calling AE's own return address


def _check_ae_title(value: str) -> str:
    """AE titles: 1-16 characters of the default repertoire, no backslash or control
    characters, not all spaces (PS3.5 6.2, VR AE). Leading/trailing spaces are not
    significant and are removed."""
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"is {len(stripped)} characters long, at most 16 are allowed")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in stripped):
        raise ValueError("may contain only printable ASCII characters other than backslash")
    return stripped


def _check_uid(value: str) -> str:
    if not is_uid(value, strict=True):
        raise ValueError(f"{value!r} is not a valid DICOM UID")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
UIDStr = Annotated[str, AfterValidator(_check_uid)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedCaller(_Model):
    """A peer allowed to open associations (and, optionally, from where and what)."""

    ae_title: AETitle
    host: str | None = Field(
        default=None,
        description="IP address (or network in CIDR form) the peer must connect from",
    )
    sop_classes: tuple[UIDStr, ...] | None = Field(
        default=None, description="SOP Class UIDs this peer may store; all when absent"
    )
    return_to: str | None = Field(
        default=None,
        description="the destination that is this peer's own return address: rules that send"
        " to '@sender' send results of studies it sent there",
    )

    @field_validator("host")
    @classmethod
    def _host_is_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
            ) from None
        return value

    def host_matches(self, address: str) -> bool:
        if self.host is None:
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class CompletionConfig(_Model):
    """When a study counts as complete (PS3.4 does not say: the node decides)."""

    quiet_seconds: float = Field(
        default=5.0,
        gt=0,
        le=86400,
        description="a study completes after this many seconds without a new instance",
    )
    on_association_release: bool = Field(
        default=False,
        description="complete the studies an association brought as soon as it is released",
    )
    expected_instances: int | None = Field(
        default=None, ge=1, description="complete a study once it holds this many instances"
    )
    use_number_of_study_related_instances: bool = Field(
        default=False,
        description="complete once the count in (0020,1208) NumberOfStudyRelatedInstances is reached",
    )


class DestinationTls(_Model):
    """DICOM TLS towards a destination (the node is the TLS client)."""

    ca_file: str | None = Field(
        default=None,
        description="CA certificates (PEM) the peer's certificate must chain to;"
        " the system's trust store when absent",
    )
    certfile: str | None = Field(default=None, description="the node's client certificate (PEM)")
    keyfile: str | None = Field(default=None, description="the private key of certfile (PEM)")
    server_hostname: str | None = Field(
        default=None, description="the name the peer's certificate must carry; the host when absent"
    )

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self


class InferenceConfig(_Model):
    """The in-process worker that runs the models."""

    enabled: bool = Field(default=True, description="run jobs in this process")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    lease_seconds: float = Field(default=300.0, gt=0, description="a job's lease, extended while it runs")
    max_attempts: int = Field(default=3, ge=1, le=100)
    retry_backoff_seconds: float = Field(default=10.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=600.0, gt=0)
    preload: bool = Field(default=True, description="load the routed models at start-up (warm)")


class ExportConfig(_Model):
    """Delivery of results: retries with exponential backoff, jitter and a ceiling."""

    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    give_up_after_hours: float | None = Field(
        default=None, gt=0, description="stop retrying a delivery after this long; never if unset"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ExportConfig:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("retry_max_seconds must be at least retry_base_seconds")
        return self


class HttpToken(_Model):
    """A bearer token allowed on the HTTP API, stored only as its SHA-256 (hex).

    Make one with: python -c "import hashlib,secrets; t=secrets.token_urlsafe(32);
    print(t, hashlib.sha256(t.encode()).hexdigest())"
    """

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class HttpConfig(_Model):
    """The HTTP front door: DICOMweb (STOW-RS, QIDO-RS, WADO-RS), /healthz, /readyz, /metrics.

    Loopback by default; bind another address only with tokens (and HTTPS) set.
    """

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port (logged)")
    tokens: tuple[HttpToken, ...] = Field(
        default=(), description="when non-empty, DICOMweb requests need one of these bearer tokens"
    )
    certfile: Path | None = Field(default=None, description="HTTPS certificate chain")
    keyfile: Path | None = None
    ca_file: Path | None = Field(default=None, description="CA for client certificates (mTLS)")
    require_client_cert: bool = False
    public_url: str | None = Field(default=None, description="DICOMweb root as clients see it")
    cors_origins: tuple[str, ...] = Field(
        default=(), description="browser origins allowed to call DICOMweb (e.g. an OHIF viewer)"
    )
    max_request_mb: float = Field(default=8192, gt=0)
    max_part_mb: float = Field(default=2048, gt=0)

    @model_validator(mode="after")
    def _tls_complete(self) -> HttpConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if self.require_client_cert and (self.ca_file is None or self.certfile is None):
            raise ValueError("require_client_cert needs certfile, keyfile and ca_file")
        return self


class AuditForwardConfig(_Model):
    """IHE ATNA forwarding: RFC 5424 syslog over TLS (RFC 5425) to an audit repository."""

    host: str = Field(min_length=1)
    port: Port = 6514
    ca_file: Path
    certfile: Path | None = None
    keyfile: Path | None = None


class AuditConfig(_Model):
    """The encrypted, hash-chained audit trail (PS3.15 A.5 messages)."""

    enabled: bool = True
    folder: Path | None = Field(default=None, description="default: <storage>/audit")
    keys: Path | None = Field(
        default=None,
        description="key folder (default <storage>/keys); created on first start if missing",
    )
    forward: AuditForwardConfig | None = None


class RetentionConfig(_Model):
    """Purging old data, only once everything owed for it has been delivered."""

    enabled: bool = False
    max_age_days: float = Field(default=30.0, gt=0)
    keep_failed_days: float = Field(default=90.0, gt=0)
    interval_minutes: float = Field(default=60.0, gt=0)
    dry_run: bool = Field(default=False, description="report what would be purged; delete nothing")
    min_free_gb: float = Field(
        default=0.5, ge=0,
        description="refuse new instances (0xA700) below this much free disk; always on",
    )
    min_free_ratio: float = Field(default=0.0, ge=0, lt=1)


#: De-identification profiles a destination may name (dicomnode.export.deidentify).
DEIDENTIFY_PROFILES = ("basic",)


class DeidentifyOptions(_Model):
    """Options of the PS3.15 Annex E profile applied to an off-site destination."""

    retain_longitudinal_modified_dates: bool = Field(
        default=False,
        description="Retain Longitudinal Temporal Information with Modified Dates Option"
        " (E.3.6): dates shifted by a per-patient offset instead of removed",
    )
    clean_descriptors: bool = Field(
        default=False,
        description="Clean Descriptors Option (E.3.5): keep descriptions that hold no"
        " identifying value of the instance, instead of removing them",
    )
    allow_burned_in: bool = Field(
        default=False,
        description="send instances with Burned In Annotation YES (their pixels are not"
        " cleaned); refused otherwise",
    )


class Destination(_Model):
    """A peer results are sent to: a DICOM node (C-STORE) or a DICOMweb STOW-RS URL.

    ``objects`` says which result objects it gets: DICOM-SEG and the TID 1500 SR for
    viewers that show them; GSPS contours and/or a burned-in secondary capture for
    viewers that cannot show SEG.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["dimse", "stowrs"] = "dimse"
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = Field(default=None, description="STOW-RS base URL (protocol stowrs)")
    objects: tuple[Literal["seg", "sr", "gsps", "sc"], ...] = ("seg", "sr")
    tls: DestinationTls | None = Field(default=None, description="DICOM TLS (dimse only)")
    deidentify: bool = Field(
        default=False,
        description="off-site: everything sent here is de-identified first (PS3.15 Annex E)",
    )
    deidentify_profile: str = Field(default="basic", description="one of DEIDENTIFY_PROFILES")
    deidentify_options: DeidentifyOptions = DeidentifyOptions()

    @field_validator("deidentify_profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in DEIDENTIFY_PROFILES:
            raise ValueError(f"unknown de-identification profile {value!r}"
                             f" (known: {', '.join(DEIDENTIFY_PROFILES)})")
        return value

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.protocol == "dimse":
            missing = [f for f in ("ae_title", "host", "port") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)}")
        elif not self.url or not re.match(r"^https?://", self.url):
            raise ValueError("a stowrs destination needs url: http(s)://...")
        if not self.objects:
            raise ValueError("objects must list at least one of seg, sr, gsps, sc")
        if self.deidentify and "sc" in self.objects and not self.deidentify_options.allow_burned_in:
            raise ValueError("objects: 'sc' results have burned-in annotation; a de-identified"
                             " destination takes them only with deidentify_options.allow_burned_in")
        return self


class _Range(_Model):
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


class SeriesMatch(_Model):
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


class Rule(_Model):
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


class NodeConfig(_Model):
    """The whole service configuration."""

    ae_title: AETitle = "DICOMNODE"
    bind_address: str = Field(
        default="127.0.0.1",
        description="address the DIMSE port listens on: loopback by default; a network"
        " address (or 0.0.0.0) needs allowed_callers, or accept_any_caller: true",
    )
    port: Port = 11112
    storage: Path = Field(default=Path("dicomnode-data"), description="spool and index folder")
    allowed_callers: tuple[AllowedCaller, ...] = Field(
        default=(), description="when non-empty, only these calling AE titles may associate"
    )
    accept_any_caller: bool = Field(
        default=False,
        description="accept any calling AE title on a network bind_address with no"
        " allowed_callers: only where a firewall already admits nothing but your senders",
    )
    completion: CompletionConfig = CompletionConfig()
    ingest: IngestConfig = IngestConfig()
    inference: InferenceConfig = InferenceConfig()
    destinations: tuple[Destination, ...] = ()
    export: ExportConfig = ExportConfig()
    audit: AuditConfig = AuditConfig()
    http: HttpConfig = HttpConfig()
    retention: RetentionConfig = RetentionConfig()
    models_dir: Path = Field(default=Path("models"), description="folder of model folders")
    routing: tuple[Rule, ...] = Field(default=(), description="ordered routing rules")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("bind_address")
    @classmethod
    def _bind_is_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @model_validator(mode="after")
    def _door_not_open_to_all(self) -> NodeConfig:
        # Refused, not warned: whatever arrives is routed to models and the results are
        # sent on to the PACS, so an open door lets anyone on the network inject studies.
        if (not ipaddress.ip_address(self.bind_address).is_loopback
                and not self.allowed_callers and not self.accept_any_caller):
            raise ValueError(
                f"allowed_callers: must list the peers that may send when bind_address"
                f" ({self.bind_address}) is reachable from the network; or set"
                " accept_any_caller: true to accept any calling AE title")
        return self

    @property
    def open_to_any_caller(self) -> bool:
        """Any calling AE title may store from the network (accept_any_caller)."""
        return (not ipaddress.ip_address(self.bind_address).is_loopback
                and not self.allowed_callers)

    @model_validator(mode="after")
    def _unique_names(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destinations: duplicate name(s) {', '.join(dupes)}")
        rules = [r.name for r in self.routing]
        dupes = sorted({n for n in rules if rules.count(n) > 1})
        if dupes:
            raise ValueError(f"routing: duplicate rule name(s) {', '.join(dupes)}")
        known = set(names)
        for i, caller in enumerate(self.allowed_callers):
            if caller.return_to is not None and caller.return_to not in known:
                raise ValueError(
                    f"allowed_callers.{i}.return_to: unknown destination {caller.return_to!r}"
                )
        for i, rule in enumerate(self.routing):
            unknown = [d for d in rule.destinations if d not in known and d != SENDER]
            if unknown:
                raise ValueError(
                    f"routing.{i}.destinations: unknown destination(s) {', '.join(unknown)}"
                    f" (configured: {', '.join(sorted(known)) or 'none'})"
                )
        callers = [c.ae_title for c in self.allowed_callers]
        dupes = sorted({n for n in callers if callers.count(n) > 1})
        if dupes:
            raise ValueError(f"allowed_callers: duplicate AE title(s) {', '.join(dupes)}")
        return self

    def caller_allowed(self, ae_title: str, address: str) -> bool:
        """True when ``ae_title`` connecting from ``address`` may associate."""
        if not self.allowed_callers:
            return True
        title = ae_title.strip()
        return any(c.ae_title == title and c.host_matches(address) for c in self.allowed_callers)

    def resolve_destinations(self, names: tuple[str, ...], calling_ae: str) -> list[str]:
        """A rule's destination names, with '@sender' replaced by the calling AE's
        ``return_to`` destination (dropped, with no error, when it has none)."""
        out: list[str] = []
        for name in names:
            if name == SENDER:
                title = calling_ae.strip()
                name = next((c.return_to for c in self.allowed_callers
                             if c.ae_title == title and c.return_to), "")
            if name and name not in out:
                out.append(name)
        return out

    @property
    def audit_folder(self) -> Path:
        return self.audit.folder or Path(self.storage) / "audit"

    @property
    def keys_folder(self) -> Path:
        return self.audit.keys or Path(self.storage) / "keys"

    def caller_sop_classes(self, ae_title: str) -> tuple[str, ...] | None:
        """The SOP classes ``ae_title`` may store, or None for all."""
        title = ae_title.strip()
        for caller in self.allowed_callers:
            if caller.ae_title == title:
                return caller.sop_classes
        return None


def _format_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(
            err["input"], (dict, list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        problems.append((field, msg))
    return problems


def parse_config(data: dict[str, Any] | None, source: str = "<defaults>") -> NodeConfig:
    """Validate a mapping into a NodeConfig, or raise ConfigError naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("(top level)", "must be a mapping of settings")])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> NodeConfig:
    """Load the YAML file at ``path`` (or the embedded defaults) and apply overrides.

    ``overrides`` holds top-level settings given on the command line; they win over
    the file.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, [("(file)", f"cannot read: {exc.strerror}")]) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
            raise ConfigError(source, [(where, f"not valid YAML: {exc}")]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(source, [("(top level)", "must be a mapping of settings")])
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return parse_config(data, source)
