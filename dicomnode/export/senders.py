"""The :class:`~dicomnode.export.base.Sender` for a configured destination."""

from __future__ import annotations

from typing import Any

from dicomnode.config import Destination
from dicomnode.export.base import Sender


def make_sender(destination: Destination, calling_ae: str, **options: Any) -> Sender:
    """The :class:`Sender` for a configured destination (``protocol`` dimse or stowrs).

    ``calling_ae`` is the node's AE title (used by DIMSE). ``options`` go to the
    implementation: ``timeout`` (seconds, both), ``classify`` (a
    :data:`~dicomnode.export.base.StatusClassifier`, both), ``acse_timeout`` /
    ``dimse_timeout`` / ``network_timeout`` (DIMSE), ``headers`` / ``session`` (STOW-RS).
    """
    if destination.deidentify:
        # never send identifiable data to an off-site destination by mistake: only
        # dicomnode.export.deidentify.deidentifying_sender_factory may build its sender
        raise ValueError(f"destination {destination.name} is marked deidentify: its sender"
                         " comes from dicomnode.export.deidentify.deidentifying_sender_factory")
    if destination.protocol == "dimse":
        from dicomnode.export.dimse import DimseStoreSender, Peer

        assert destination.ae_title and destination.host and destination.port  # validated
        peer = Peer(destination.ae_title, destination.host, destination.port)
        return DimseStoreSender(peer, calling_ae, tls=destination.tls, **options)
    if destination.protocol == "stowrs":
        from dicomnode.export.stowrs import StowRsSender

        assert destination.url  # validated by config
        return StowRsSender(destination.url, **options)
    raise ValueError(f"destination {destination.name}: unknown protocol {destination.protocol!r}")
