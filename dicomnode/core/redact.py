"""Keeping attribute values (patient names, IDs, ...) out of logs and databases.

Validators and libraries quote the values they object to: dciodvfy writes
``(0x0010,0x0010) PN Patient's Name PN [1] = <DOE^JANE> - Length invalid ...`` and
pydicom ``Invalid value for VR DA: '2020131'``. What the node logs or stores in a
database (a job's ``last_error``) keeps the tag and the problem and drops the value:

* a ``<...>`` is kept where dciodvfy names an attribute, module or macro with it
  (``Element=<PatientName>``, ``Module=<Patient>``, ``of attribute <Rows>``), and
  replaced by ``<…>`` everywhere else (``= <value>``, ``value <Q> for``);
* a quoted ``'...'`` or ``"..."`` is kept only when it is a DICOM keyword
  (``'PatientName'``: it names an attribute) and replaced by ``'…'`` otherwise.

This is reliable for dciodvfy's structured lines and a best effort for free text.
:func:`describe_exception` and :func:`traceback_text` give an exception's type and
redacted message, and its frames without any message, for the log.
"""

from __future__ import annotations

import re
import traceback
from functools import lru_cache

_NAMES = re.compile(r"(?:Element|Module|Macro|Attribute|attribute|Sequence|sequence)\s*=?\s*$")
# one left-to-right pass: an apostrophe inside <Patient's Sex> opens no quote
# (an apostrophe inside a word, Patient's, is no quote either)
_TOKEN = re.compile(r"<([^<>\n]*)>|(?<![A-Za-z])'([^'\n]*)'(?![A-Za-z])|\"([^\"\n]*)\"")
ELLIPSIS = "\u2026"


@lru_cache(maxsize=1)
def _keywords() -> frozenset[str]:
    from pydicom.datadict import keyword_dict

    return frozenset(keyword_dict)


def redact_values(text: str) -> str:
    """``text`` with every quoted attribute value replaced by ``…`` (see the module)."""
    def token(m: re.Match[str]) -> str:
        if m.group(1) is not None:  # <...>
            if _NAMES.search(text[max(0, m.start() - 12):m.start()]):
                return m.group(0)
            return f"<{ELLIPSIS}>"
        inner = m.group(2) if m.group(2) is not None else m.group(3)
        if inner in _keywords():
            return m.group(0)
        q = m.group(0)[0]
        return f"{q}{ELLIPSIS}{q}"

    return _TOKEN.sub(token, text)


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` with values redacted (for a database or a log line)."""
    message = redact_values(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def traceback_text(exc: BaseException) -> str:
    """Where ``exc`` (and its causes) were raised: frames and types, no messages."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if lines:
            lines.append("caused by:\n")
        lines.extend(traceback.format_tb(current.__traceback__))
        lines.append(f"{type(current).__module__}.{type(current).__qualname__}\n")
        current = current.__cause__ or current.__context__
    return "".join(lines).rstrip()
