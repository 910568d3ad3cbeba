"""DICOM TLS (PS3.15 B.1 "Basic TLS Secure Transport Connection Profile", BCP 195).

Builds the :class:`ssl.SSLContext` objects for the node's acceptor (server) and
requestor (client) sides: TLS 1.2 is the minimum, Python's default cipher list
(which already excludes the suites BCP 195 forbids), and certificate checks on.

Private keys are checked like the audit keys (:mod:`dicomnode.audit.keys`) before they
are loaded: a key file that group or others may read or write is refused, naming the
setting and the fix, rather than used without a word (:func:`check_key_file`).
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import ConfigError

if TYPE_CHECKING:  # config sits above core; only its types are needed here
    from dicomnode.config import DestinationTls, TlsConfig

LOG = logging.getLogger(__name__)


#: no access at all for group or others (as for the audit keys)
_SECRET_BITS = 0o077


def check_key_file(path: str | os.PathLike[str], setting: str) -> None:
    """Refuse (ConfigError naming ``setting``) a private key file that group or others
    may read or write, or that is not a regular file. Symbolic links are followed (a
    certificate tool's ``live/`` links): the file they lead to is what counts."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(setting, [(setting, f"cannot read the key file {path}: "
                                              f"{exc.strerror}")]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(setting, [(setting, f"{path} is not a regular file")])
    if st.st_mode & _SECRET_BITS:
        raise ConfigError(setting, [(setting, (
            f"the private key {path} has permissions {stat.filemode(st.st_mode)}: group or"
            f" others may read it; refusing it (`chmod 600 {Path(path).resolve()}`)"))])


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The acceptor's context: the node's certificate chain, and, with
    ``require_client_cert``, a client certificate that chains to ``ca_file``."""
    check_key_file(tls.keyfile, "ingest.tls.keyfile")
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
    if tls.keyfile:
        check_key_file(tls.keyfile, "destinations.tls.keyfile")
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
