"""Volume buffers kept from job to job, so that loading a series costs no page faults.

A 300-slice 512x512 CT is a 315 MB float32 array. The first such array of a process
costs up to a second of page faults (the kernel zeroes, and with transparent huge pages
first compacts, the memory numpy asks for); ``bench/volume.py`` loads the same series
in ~0.1 s once that memory is mapped. The worker therefore keeps the arrays its jobs
were loaded into and hands them to the next job: :meth:`VolumeBuffers.take` is the
``allocate`` of :func:`dicomnode.inference.volume.load_series`, and
:meth:`VolumeBuffers.give_back` returns a buffer once the model is done with the
volume. At most ``keep`` buffers are kept (one per job that may be loaded at once), and
none larger than ``max_bytes``; :meth:`prime` maps one of a typical size at start-up.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

LOG = logging.getLogger(__name__)

#: 300 slices of 512 x 512 float32: the size primed at start-up.
TYPICAL_SHAPE = (300, 512, 512)
#: Buffers above this size (2 GiB, e.g. a 1500-slice CT) are not kept.
MAX_BYTES = 2 << 30


class VolumeBuffers:
    """A small pool of float32 buffers for volumes (thread-safe)."""

    def __init__(self, keep: int = 2, max_bytes: int = MAX_BYTES) -> None:
        if keep < 0:
            raise ValueError(f"keep: must be >= 0, got {keep}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
        self.keep = keep
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []  # flat float32 arrays
        self._lent: dict[int, np.ndarray] = {}  # id(view) -> the flat array behind it
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, int, int]) -> np.ndarray:
        """A C-contiguous float32 array of ``shape`` (uninitialised): the smallest kept
        buffer that is large enough, else a new one."""
        n = int(np.prod(shape))
        with self._lock:
            fits = [b for b in self._free if b.size >= n]
            base = min(fits, key=lambda b: b.size) if fits else None
            if base is not None:
                self._free.remove(base)
        if base is None:
            base = np.empty(n, dtype=np.float32)
        view = base[:n].reshape(shape)
        with self._lock:
            self._lent[id(view)] = base
        return view

    def give_back(self, array: np.ndarray) -> None:
        """Return an array :meth:`take` gave out; the caller must hold no reference to
        it (nor to a view of it) any more. Arrays not from :meth:`take` are ignored."""
        with self._lock:
            base = self._lent.pop(id(array), None)
            if base is None or base.nbytes > self.max_bytes:
                return
            self._free.append(base)
            self._free.sort(key=lambda b: b.size, reverse=True)
            del self._free[self.keep:]  # keep the largest

    def prime(self, shape: tuple[int, int, int] = TYPICAL_SHAPE) -> None:
        """Map one buffer of ``shape`` now (touching every page), for the first job."""
        if self.keep == 0:
            return
        buf = self.take(shape)
        buf.fill(0.0)
        self.give_back(buf)
        LOG.debug("volume buffer of %s primed (%.0f MB)", shape, buf.nbytes / 1e6)

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)
