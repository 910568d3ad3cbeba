"""Opening the audit recorder of a process from the config.

Each writing process has its own hash chain (the trail allows one writer per
folder): ``<audit>/node`` for the main process, ``<audit>/receiver-N`` for the
receiving processes, ``<audit>/cli`` for commands. ``dicomnode audit verify``
checks them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.audit.recorder import Audit, AuditRecorder, NullAudit
from dicomnode.config import NodeConfig

if TYPE_CHECKING:
    from dicomnode.audit.keys import Keyring

LOG = logging.getLogger(__name__)


def open_keyring(config: NodeConfig, *, create: bool = True) -> Keyring:
    """Load the key folder (refusing unsafe permissions); create it on first use."""
    from dicomnode.audit.keys import Keyring

    folder = config.keys_folder
    if not folder.exists() and create:
        LOG.warning("no audit keys at %s: creating them (back up this folder; keep the"
                    " public key for auditors)", folder)
        return Keyring.init(folder)
    return Keyring.load(folder)


def open_audit(config: NodeConfig, chain: str, *, forward: bool = False) -> Audit:
    """The recorder for one process; NullAudit when auditing is off."""
    if not config.audit.enabled:
        return NullAudit()
    from dicomnode.audit.model import NodeIdentity
    from dicomnode.audit.trail import AuditTrail

    fc = config.audit.forward
    if forward and fc is not None:  # refuse a readable private key before opening anything
        from dicomnode.core.tls import check_key_file

        if fc.keyfile is not None:
            check_key_file(fc.keyfile, "audit.forward.keyfile")
        elif fc.certfile is not None:  # the private key is in the certificate file
            check_key_file(fc.certfile, "audit.forward.certfile")
    keyring = open_keyring(config)
    trail = AuditTrail(Path(config.audit_folder) / chain, keyring)
    forwarder = None
    if forward and fc is not None:
        from dicomnode.audit.forward import Forwarder

        forwarder = Forwarder(
            Path(config.audit_folder) / "forward-queue", fc.host, fc.port, fc.ca_file,
            certfile=fc.certfile, keyfile=fc.keyfile,
            queue_key=keyring.data_key(keyring.current_key_id),
        )
        forwarder.start()
    return AuditRecorder(trail, forwarder, NodeIdentity(ae_title=config.ae_title))


def chains(config: NodeConfig) -> list[Path]:
    """Every hash-chain folder of the trail."""
    root = Path(config.audit_folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "forward-queue")
