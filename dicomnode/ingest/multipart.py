"""A streaming multipart/related parser (RFC 2387 / RFC 2046 5.1) for STOW-RS.

``MultipartParser`` is push-driven: ``feed(chunk)`` returns the parts completed
by that chunk, ``finish()`` checks that the closing delimiter was seen. Each
part's body goes straight to a temp file in the given folder, so an upload never
sits whole in memory; the buffer held is bounded by the header limit plus one
chunk. Every problem raises ``MultipartError`` with a reason; ``close()`` (or
``Part.discard()``) removes the temp files.

``room`` (optional) is asked before each part's temp file is created and again after
every ``room_every`` bytes written to it: a disk guard, so that one upload cannot fill
the disk past it; when it says no, the part in progress is removed and
``MultipartError`` (HTTP 503, DICOM 0xA700) is raised.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_HEADER_BYTES = 16 * 1024
MAX_BOUNDARY = 200  # RFC 2046 5.1.1 says 70; Orthanc sends 73


class MultipartError(ValueError):
    """The body is not acceptable multipart/related; ``status`` is the HTTP status to
    answer, ``out_of_resources`` says the node (not the body) is at fault: the
    instances not stored are failed with 0xA700 rather than 0xC000."""

    def __init__(self, reason: str, status: int = 400, *, out_of_resources: bool = False
                 ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.out_of_resources = out_of_resources


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """(lower-case media type, {lower-case parameter: value}) of a Content-Type header."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        name = rest[i:j].strip().lower()
        if j >= n or rest[j] == ";":
            i = j + 1
            continue
        j += 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            j += 1
            buf = []
            while j < n and rest[j] != '"':
                if rest[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(rest[j])
                j += 1
            val = "".join(buf)
            j += 1
        else:
            k = j
            while j < n and rest[j] != ";":
                j += 1
            val = rest[k:j].strip()
        if name:
            params[name] = val
        i = j
    return media.strip().lower(), params


def boundary_from(content_type: str) -> str:
    """The boundary of a multipart Content-Type; MultipartError (415) otherwise."""
    media, params = parse_content_type(content_type)
    if media != "multipart/related":
        raise MultipartError(f"expected multipart/related, got {media or 'nothing'}", 415)
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY or not boundary.isascii():
        raise MultipartError("missing or invalid multipart boundary", 400)
    return boundary


@dataclass
class Part:
    """One received part: its headers (lower-case names) and its body in a temp file."""

    headers: dict[str, str]
    path: Path
    size: int = 0
    _fd: int | None = field(default=None, repr=False)

    @property
    def content_type(self) -> str:
        return parse_content_type(self.headers.get("content-type", ""))[0]

    def discard(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            self.path.unlink()
        except OSError:
            pass


_PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _EPILOGUE = range(5)


class MultipartParser:
    """Push parser: ``feed`` bytes, get completed parts; ``finish`` at end of input."""

    def __init__(
        self,
        boundary: str,
        folder: Path,
        *,
        max_part_bytes: int = 2 << 30,
        max_parts: int = 10000,
        max_header_bytes: int = MAX_HEADER_BYTES,
        prefix: str = "stow-",
        room: Callable[[], tuple[bool, str]] | None = None,
        room_every: int = 16 << 20,
    ) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise MultipartError("missing or invalid multipart boundary")
        self.folder = Path(folder)
        self.max_part_bytes = max_part_bytes
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.prefix = prefix
        self.room = room
        self.room_every = room_every
        self._since_room = 0
        self._first = b"--" + boundary.encode("ascii")
        self._delim = b"\r\n" + self._first
        self._buf = bytearray()
        self._state = _PREAMBLE
        self._part: Part | None = None
        self._count = 0
        self._open: list[Part] = []
        self.done = False

    # -- public ---------------------------------------------------------------

    def feed(self, data: bytes) -> list[Part]:
        """Consume ``data``; return the parts whose body ended in it."""
        if self.done and self._state == _EPILOGUE:
            return []  # the epilogue is ignored (RFC 2046)
        self._buf += data
        out: list[Part] = []
        try:
            while self._step(out):
                pass
        except BaseException:
            for p in out:
                p.discard()
            self.close()
            raise
        return out

    def finish(self) -> None:
        """End of input: raise unless the closing delimiter was seen."""
        if not self.done:
            self.close()
            raise MultipartError("multipart body ends before its closing delimiter")

    def close(self) -> None:
        """Remove the temp file of the part in progress (completed parts belong to the caller)."""
        if self._part is not None:
            self._part.discard()
            self._part = None

    # -- state machine -----------------------------------------------------------

    def _step(self, out: list[Part]) -> bool:
        buf = self._buf
        st = self._state
        if st == _PREAMBLE:
            # the first delimiter may come at the very start (no leading CRLF)
            if buf.startswith(self._first):
                del buf[: len(self._first)]
                self._state = _AFTER_DELIM
                return True
            i = buf.find(self._delim)
            if i >= 0:
                del buf[: i + len(self._delim)]
                self._state = _AFTER_DELIM
                return True
            if len(buf) > 64 * 1024:
                raise MultipartError("no multipart boundary found")
            return False
        if st == _AFTER_DELIM:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.done = True
                self._state = _EPILOGUE
                buf.clear()
                return False
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > 256:
                    raise MultipartError("malformed multipart delimiter line")
                return False
            if buf[:i].strip(b" \t"):
                raise MultipartError("malformed multipart delimiter line")
            del buf[: i + 2]
            self._state = _HEADERS
            return True
        if st == _HEADERS:
            i = buf.find(b"\r\n\r\n") if not buf.startswith(b"\r\n") else -2
            if i == -1:
                if len(buf) > self.max_header_bytes:
                    raise MultipartError("multipart part headers too large")
                return False
            if i == -2:  # no headers at all
                raw, cut = b"", 2
            else:
                raw, cut = bytes(buf[:i]), i + 4
            if len(raw) > self.max_header_bytes:
                raise MultipartError("multipart part headers too large")
            headers = _parse_headers(raw)
            del buf[:cut]
            self._count += 1
            if self._count > self.max_parts:
                raise MultipartError(f"more than {self.max_parts} parts", 413)
            self._part = self._new_part(headers)
            self._state = _BODY
            return True
        if st == _BODY:
            assert self._part is not None
            i = buf.find(self._delim)
            if i >= 0:
                self._write(buf[:i])
                del buf[: i + len(self._delim)]
                part = self._part
                self._part = None
                assert part._fd is not None
                os.close(part._fd)
                part._fd = None
                out.append(part)
                self._state = _AFTER_DELIM
                return True
            keep = len(self._delim) - 1
            if len(buf) > keep:
                n = len(buf) - keep
                self._write(buf[:n])
                del buf[:n]
            return False
        return False  # epilogue

    def _check_room(self) -> None:
        if self.room is None:
            return
        ok, why = self.room()
        if not ok:
            raise MultipartError(f"cannot store the upload now: {why}", 503,
                                 out_of_resources=True)

    def _new_part(self, headers: dict[str, str]) -> Part:
        self._check_room()
        self._since_room = 0
        path = self.folder / f"{self.prefix}{secrets.token_hex(8)}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MultipartError(f"cannot buffer the upload: {exc.strerror}", 503,
                                 out_of_resources=True) from None
        return Part(headers, path, 0, fd)

    def _write(self, data: bytearray | bytes) -> None:
        part = self._part
        assert part is not None and part._fd is not None
        if part.size + len(data) > self.max_part_bytes:
            raise MultipartError(f"a part is larger than {self.max_part_bytes} bytes", 413)
        self._since_room += len(data)
        if self._since_room >= self.room_every:
            self._since_room = 0
            self._check_room()
        view = memoryview(data)
        try:
            while view:
                n = os.write(part._fd, view)
                view = view[n:]
        except OSError as exc:
            raise MultipartError(f"cannot buffer the upload: {exc.strerror}", 503,
                                 out_of_resources=True) from None
        part.size += len(data)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not raw:
        return headers
    text = raw.decode("latin-1")
    last = ""
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and last:  # obsolete folding
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError("malformed multipart part header")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers
