"""Choosing the device a model runs on: CUDA when present, otherwise the CPU."""

from __future__ import annotations

import logging

LOG = logging.getLogger(__name__)


def choose_device(preference: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; or the named device.

    Asking for ``cuda`` on a machine without one is an error, not a silent fallback.
    """
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but torch sees no CUDA device")
    return preference
