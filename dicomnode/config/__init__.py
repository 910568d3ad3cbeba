"""Typed, validated, frozen service configuration.

One YAML file configures the whole node. Every field has an embedded default, so
the node starts with no file at all. The config is loaded once (``load_config``)
and passed down as an argument; nothing reads it from a global.

The schema lives in the package's modules, one per part (``base``: value types;
``sections``; ``http``; ``routing``; ``workers``); this module composes them into
:class:`NodeConfig` and reads the YAML file.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dicomnode.config.base import SENDER, AETitle, Model, Port
from dicomnode.config.http import HttpConfig, HttpToken
from dicomnode.config.ingest import IngestConfig, TlsConfig
from dicomnode.config.routing import DEFAULT_ROUTING, Rule, SeriesMatch
from dicomnode.config.sections import (
    DEIDENTIFY_PROFILES,
    AllowedCaller,
    AuditConfig,
    AuditForwardConfig,
    CompletionConfig,
    DeidentifyOptions,
    Destination,
    DestinationTls,
    ExportConfig,
    InferenceConfig,
    RetentionConfig,
)
from dicomnode.config.workers import QueueConfig, WorkerConfig
from dicomnode.errors import ConfigError

__all__ = ["DEFAULT_ROUTING", "DEIDENTIFY_PROFILES", "SENDER", "AllowedCaller", "AuditConfig",
           "AuditForwardConfig", "CompletionConfig", "ConfigError", "DeidentifyOptions",
           "Destination", "DestinationTls", "ExportConfig", "HttpConfig", "HttpToken",
           "InferenceConfig", "IngestConfig", "NodeConfig", "QueueConfig", "RetentionConfig",
           "Rule", "SeriesMatch", "TlsConfig", "WorkerConfig", "load_config", "parse_config"]


class NodeConfig(Model):
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
    queue: QueueConfig = QueueConfig()
    worker: WorkerConfig = WorkerConfig()
    destinations: tuple[Destination, ...] = ()
    export: ExportConfig = ExportConfig()
    audit: AuditConfig = AuditConfig()
    http: HttpConfig = HttpConfig()
    retention: RetentionConfig = RetentionConfig()
    models_dir: Path = Field(default=Path("models"), description="folder of model folders")
    routing: tuple[Rule, ...] = Field(
        default=DEFAULT_ROUTING,
        description="ordered routing rules; by default an axial chest CT goes to lung_density"
        " (DEFAULT_ROUTING); [] runs no model",
    )
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
