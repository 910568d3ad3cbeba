"""A receiving process: runs the C-STORE SCP on a listening socket inherited from
the node's main process (``python -m dicomnode.ingest.worker --fd N``).

It writes instances to the shared spool and index; the main process owns the
completion timers. It dies with its parent (PR_SET_PDEATHSIG), and on SIGTERM it
stops accepting, lets stores in flight finish and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from dicomnode.audit.setup import open_audit
from dicomnode.config import NodeConfig
from dicomnode.core.index import Index
from dicomnode.ingest.scp import StoreSCP
from dicomnode.ingest.spool import Spool

LOG = logging.getLogger("dicomnode.ingest.worker")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() == 1:  # parent already gone
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicomnode.ingest.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--number", type=int, default=0)
    args = parser.parse_args(argv)
    _die_with_parent()
    config = NodeConfig.model_validate(json.loads(os.environ["DICOMNODE_CONFIG_JSON"]))
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s receiver-{args.number} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    spool = Spool(Path(config.storage))
    index = Index(Index.path_for(config.storage))
    audit = open_audit(config, f"receiver-{args.number}")
    scp = StoreSCP(config, spool, index, audit=audit)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scp.start(sock)
    stop.wait()
    scp.stop(timeout=config.ingest.dimse_timeout)
    close = getattr(audit, "close", None)
    if close is not None:
        close()
    index.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
