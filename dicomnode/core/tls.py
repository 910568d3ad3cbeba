"""DICOM TLS (PS3.15 B.1 "Basic TLS Secure Transport Connection Profile", BCP 195).

Builds the :class:`ssl.SSLContext` objects for the node's acceptor (server) and
requestor (client) sides: TLS 1.2 is the minimum, Python's default cipher list
(which already excludes the suites BCP 195 forbids), and certificate checks on.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from dicomnode.errors import ConfigError

if TYPE_CHECKING:  # config sits above core; only its types are needed here
    from dicomnode.config import DestinationTls, TlsConfig

LOG = logging.getLogger(__name__)


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The acceptor's context: the node's certificate chain, and, with
    ``require_client_cert``, a client certificate that chains to ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("ingest.tls", [("ingest.tls", f"cannot load the certificates: {exc}")]) from exc
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file:
        ctx.verify_mode = ssl.CERT_OPTIONAL  # checked when the client presents one
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: DestinationTls) -> ssl.SSLContext:
    """The requestor's context: the peer's certificate must chain to ``ca_file`` (or
    the system trust store) and name the host; the node's own certificate if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.certfile and tls.keyfile:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("destination tls", [("tls", f"cannot load the certificates: {exc}")]) from exc
    return ctx
