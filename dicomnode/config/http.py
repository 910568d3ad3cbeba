"""The HTTP front door's part of the configuration (``http:`` in the YAML file).

Typed, validated and frozen like the rest of :mod:`dicomnode.config` (which re-exports
these classes). The validators refuse the settings that would expose patient data:

* DICOMweb on a non-loopback address without bearer tokens (anyone who reaches the
  port reads every study), unless ``allow_unauthenticated`` says the network around
  the node already decides who reaches it (e.g. a container port published on the
  host's loopback only);
* a wildcard CORS origin (``"*"``) without tokens (any web page the user opens could
  read the studies from the node on the loopback), or with ``cors_allow_credentials``
  (browsers forbid the pair; starlette would echo every origin instead);
* a wildcard in ``allowed_hosts`` without tokens (it turns off the DNS-rebinding
  guard).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Host header names the HTTP side always answers to (besides bind address, public_url).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST_RE = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*)$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def is_loopback(address: str) -> bool:
    """An IP address of the loopback interface (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


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
        default=(), description="when non-empty, DICOMweb requests (and /metrics) need one of"
        " these bearer tokens; required on a non-loopback bind_address"
    )
    metrics_tokens: tuple[HttpToken, ...] = Field(
        default=(), description="bearer tokens that open /metrics only (e.g. for Prometheus);"
        " /metrics takes these or http.tokens"
    )
    allow_unauthenticated: bool = Field(
        default=False, description="serve DICOMweb without tokens on a non-loopback"
        " bind_address: only where the network around already decides who reaches the port"
        " (e.g. a container port published on the host's loopback)"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(), description="Host header names accepted besides the loopback names, the"
        " bind address and public_url's host (e.g. node.example.org, *.example.org);"
        " others get 400 (DNS rebinding)"
    )
    certfile: Path | None = Field(default=None, description="HTTPS certificate chain")
    keyfile: Path | None = None
    ca_file: Path | None = Field(default=None, description="CA for client certificates (mTLS)")
    require_client_cert: bool = False
    public_url: str | None = Field(default=None, description="DICOMweb root as clients see it")
    cors_origins: tuple[str, ...] = Field(
        default=(), description="browser origins allowed to call DICOMweb (e.g. an OHIF viewer)"
    )
    cors_allow_credentials: bool = Field(
        default=False, description="let browsers send cookies / client certificates with"
        " cross-origin requests (never with a '*' origin)"
    )
    max_request_mb: float = Field(default=8192, gt=0)
    max_part_mb: float = Field(default=2048, gt=0)
    viewer_dir: Path | None = Field(
        default=None, description="installed OHIF build served at /viewer/ (default: the source"
        " tree's viewer/ohif-<version>, where `make viewer` puts it)"
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, le=3600,
        description="a connection that has not sent a complete request head by then is closed"
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600,
        description="a request body that stalls this long is dropped (its temp file removed)"
    )
    keep_alive_seconds: float = Field(
        default=5.0, gt=0, le=3600, description="an idle keep-alive connection is closed after"
    )
    max_connections: int = Field(
        default=512, ge=8, le=65536,
        description="open connections at most; at the cap the oldest one still sending its"
        " request head is closed for a new one, else the new one is refused"
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in value:
            h = host.strip().lower().strip("[]")
            if not (_HOST_RE.match(h) or _is_ip(h)):
                raise ValueError(f"{host!r} is not a host name, IP address or *.domain")
            out.append(h)
        return tuple(out)

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r} is not an http(s):// URL with a host")
        return value

    @model_validator(mode="after")
    def _safe(self) -> HttpConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if self.require_client_cert and (self.ca_file is None or self.certfile is None):
            raise ValueError("require_client_cert needs certfile, keyfile and ca_file")
        if not self.enabled:
            return self
        if not self.tokens and not is_loopback(self.bind_address) and \
                not self.allow_unauthenticated:
            raise ValueError(
                f"bind_address: {self.bind_address} is not a loopback address, and http.tokens"
                " is empty: anyone who reaches the port could read every study. Set"
                " http.tokens (and HTTPS), or http.allow_unauthenticated: true where the"
                " network around already decides who reaches the port")
        if "*" in self.cors_origins:
            if self.cors_allow_credentials:
                raise ValueError("cors_origins: '*' together with cors_allow_credentials"
                                 " would let every web site call DICOMweb as the user")
            if not self.tokens:
                raise ValueError("cors_origins: '*' without http.tokens would let any web page"
                                 " the user opens read the studies; name the viewer's origin")
        if "*" in self.allowed_hosts and not self.tokens:
            raise ValueError("allowed_hosts: '*' without http.tokens turns off the guard"
                             " against DNS rebinding; name the host names instead")
        return self

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every Host name accepted: loopback names, the bind address when it is not a
        wildcard, public_url's host, and ``allowed_hosts``."""
        out = list(LOOPBACK_HOSTS)
        if self.bind_address not in ("0.0.0.0", "::"):
            out.append(self.bind_address.lower())
        if self.public_url:
            host = urlsplit(self.public_url).hostname
            if host:
                out.append(host.lower())
        out.extend(self.allowed_hosts)
        return tuple(dict.fromkeys(out))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
