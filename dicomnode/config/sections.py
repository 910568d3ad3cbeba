"""The sections of the node's configuration: who may send, completion, DIMSE ingest and
TLS, inference, export and destinations (with de-identification), audit, retention."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dicomnode.config.base import AETitle, Model, Port, UIDStr


class AllowedCaller(Model):
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


class CompletionConfig(Model):
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


class DestinationTls(Model):
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


class InferenceConfig(Model):
    """The in-process worker that runs the models."""

    enabled: bool = Field(default=True, description="run jobs in this process")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    lease_seconds: float = Field(default=300.0, gt=0, description="a job's lease, extended while it runs")
    max_attempts: int = Field(default=3, ge=1, le=100)
    retry_backoff_seconds: float = Field(default=10.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=600.0, gt=0)
    preload: bool = Field(default=True, description="load the routed models at start-up (warm)")
    in_process: bool = Field(
        default=False,
        description="with queue.backend celery: also run jobs in this process (remote workers"
        " run them otherwise); with sqlite jobs always run in this process",
    )
    parallel_jobs: int = Field(
        default=0, ge=0, le=16,
        description="jobs in flight at once (0: 2 on CUDA, so that loading and encoding one "
        "study overlaps the next one's inference, 1 on the CPU); one more slot is kept for "
        "STAT jobs")


class ExportConfig(Model):
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


class AuditForwardConfig(Model):
    """IHE ATNA forwarding: RFC 5424 syslog over TLS (RFC 5425) to an audit repository."""

    host: str = Field(min_length=1)
    port: Port = 6514
    ca_file: Path
    certfile: Path | None = None
    keyfile: Path | None = None


class AuditConfig(Model):
    """The encrypted, hash-chained audit trail (PS3.15 A.5 messages)."""

    enabled: bool = True
    folder: Path | None = Field(default=None, description="default: <storage>/audit")
    keys: Path | None = Field(
        default=None,
        description="key folder (default <storage>/keys); created on first start if missing",
    )
    forward: AuditForwardConfig | None = None


class RetentionConfig(Model):
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


class DeidentifyOptions(Model):
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


class Destination(Model):
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
