"""A disk-pressure guard for the receive path: refuse new instances with a clear
reason before the disk fills, instead of failing half-way through a write. It only
looks; it never deletes anything (retention does that, and only what is owed to
nobody)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger(__name__)


class DiskGuard:
    """Says whether the file system holding ``path`` has room for more instances.

    Not ok when fewer than ``min_free_bytes`` are available to the node, or less than
    ``min_free_ratio`` of the file system is (0 disables either limit). Uses
    ``os.statvfs`` (``f_bavail``, the space an unprivileged writer may use) and caches
    the answer for ``cache_seconds`` so that it can be called for every instance.
    Never deletes anything. If the file system cannot be asked, it answers ok (the
    write itself then fails with its own status) and logs a warning.
    """

    def __init__(
        self,
        path: Path | str,
        min_free_bytes: int = 0,
        min_free_ratio: float = 0.0,
        *,
        cache_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(path, str | Path) or not str(path):
            raise ValueError(f"path: must be a folder path, not {path!r}")
        if (isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int | float)
                or not math.isfinite(min_free_bytes) or min_free_bytes < 0):
            raise ValueError(f"min_free_bytes: must be a number >= 0, not {min_free_bytes!r}")
        if (isinstance(min_free_ratio, bool) or not isinstance(min_free_ratio, int | float)
                or not 0 <= min_free_ratio < 1):
            raise ValueError(f"min_free_ratio: must be within [0, 1), not {min_free_ratio!r}")
        if not isinstance(cache_seconds, int | float) or cache_seconds < 0:
            raise ValueError(f"cache_seconds: must be >= 0, not {cache_seconds!r}")
        self.path = Path(path)
        self.min_free_bytes = int(min_free_bytes)
        self.min_free_ratio = float(min_free_ratio)
        self.cache_seconds = float(cache_seconds)
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[bool, str]] | None = None

    def check(self, *, fresh: bool = False) -> tuple[bool, str]:
        """``(ok, reason)``; the reason says how much is free and, if not ok, the limit.

        ``fresh``: ask the file system now, not the cached answer (a long upload, which
        can fill the disk faster than the cache expires)."""
        now = self._monotonic()
        with self._lock:
            if (not fresh and self._cached is not None
                    and now - self._cached[0] < self.cache_seconds):
                return self._cached[1]
            answer = self._measure()
            self._cached = (now, answer)
            return answer

    def _measure(self) -> tuple[bool, str]:
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            LOG.warning("disk guard: cannot ask the file system of %s: %s", self.path,
                        exc.strerror)
            return True, f"free space unknown ({exc.strerror}); not refusing"
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        ratio = free / total if total else 0.0
        have = f"{_gb(free)} free ({ratio:.1%} of {_gb(total)})"
        if free < self.min_free_bytes:
            return False, f"disk nearly full: {have}, below the minimum of {_gb(self.min_free_bytes)}"
        if ratio < self.min_free_ratio:
            return False, (f"disk nearly full: {have}, below the minimum of "
                           f"{self.min_free_ratio:.1%}")
        return True, have


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
