"""The DIMSE door's settings (``ingest:`` in the config file) and its DICOM TLS: part of
the typed, frozen schema of :mod:`dicomnode.config`."""

from __future__ import annotations

from pydantic import Field, model_validator

from dicomnode.config.base import Model as _Model
from dicomnode.config.base import Port


class TlsConfig(_Model):
    """DICOM TLS on the receiving side (PS3.15 B.1, BCP 195: TLS 1.2 or later).

    Without ``port`` the main port speaks only TLS; with it, the main port stays plain
    and a second server on ``port`` speaks TLS.
    """

    certfile: str = Field(description="the node's certificate chain (PEM)")
    keyfile: str = Field(description="the private key of certfile (PEM, unencrypted)")
    ca_file: str | None = Field(
        default=None, description="CA certificates (PEM) that client certificates must chain to"
    )
    require_client_cert: bool = Field(
        default=False, description="refuse a TLS client that presents no valid certificate"
    )
    port: Port | None = Field(
        default=None, description="a separate TLS port; when absent the main port is TLS-only"
    )

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsConfig:
        if self.require_client_cert and not self.ca_file:
            raise ValueError("require_client_cert needs ca_file (the CA of the client certificates)")
        return self


class IngestConfig(_Model):
    """The DIMSE receiver's tuning."""

    processes: int = Field(
        default=1,
        ge=1,
        le=32,
        description="receiving processes sharing the port; more spread associations over cores",
    )
    max_pdu_size: int = Field(
        default=256 << 10,
        ge=0,
        description="largest P-DATA-TF PDU accepted (the Maximum Length we advertise, PS3.8"
        " D.1), bytes; a longer one aborts the association. Each PDU is held in memory"
        " whole while it is read: 0 (unlimited) lets a peer make it up to 4 GiB",
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(
        default=60.0, gt=0,
        description="seconds without data (or in the middle of a PDU) before an association"
        " is dropped")
    max_associations: int = Field(
        default=32, ge=1, le=1024,
        description="associations served at once, counted once their A-ASSOCIATE-RQ has"
        " arrived; more are rejected (A-ASSOCIATE-RJ transient, local limit exceeded)")
    max_associations_per_caller: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="open associations one calling AE title may hold at once; more are"
        " rejected (A-ASSOCIATE-RJ transient, local limit exceeded)",
    )
    associate_rq_timeout: float = Field(
        default=5.0, gt=0, le=300,
        description="seconds a new connection has to deliver its whole A-ASSOCIATE-RQ (and"
        " finish a TLS handshake first); then it is closed (the ARTIM timer, PS3.8 9.1.5)")
    max_pending_per_address: int = Field(
        default=4, ge=1, le=1024,
        description="connections from one address that have not sent their A-ASSOCIATE-RQ"
        " yet; a new one beyond closes the oldest idle one")
    max_pending_connections: int = Field(
        default=64, ge=1, le=4096,
        description="connections from all addresses that have not sent their A-ASSOCIATE-RQ"
        " yet; a new one beyond closes the oldest idle one")
    max_instance_bytes: int | None = Field(
        default=5 << 30,
        ge=1,
        description="largest C-STORE data set kept, bytes (None: no limit); the data set is"
        " streamed to disk as it arrives and refused (0xA700) as soon as it grows past this."
        " The default, 5 GiB, holds any object with native pixel data (one element value is"
        " at most 2^32-2 bytes, PS3.5 7.1)",
    )
    tls: TlsConfig | None = Field(default=None, description="DICOM TLS (PS3.15 B.1)")

    @model_validator(mode="after")
    def _tls_port(self) -> IngestConfig:
        if self.tls is not None and self.tls.port is not None and self.processes > 1:
            raise ValueError("a separate ingest.tls.port needs ingest.processes: 1")
        return self
