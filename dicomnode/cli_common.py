"""What every command of the command line shares: exit codes, logging set-up, and the
configuration as the command's flags override it."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dicomnode.config import NodeConfig, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> NodeConfig:
    return load_config(getattr(args, "config", None), overrides)
