"""The conformance statement (docs/conformance.md) agrees with the code.

Its tables are generated from the code's own lists (``dicomnode.conformance``); here
they are regenerated and diffed against the file, a stale or hand-edited table is
caught, an undocumented HTTP route or C-STORE status stops the generator, and the SOP
classes / transfer syntaxes listed as accepted are put through pynetdicom's actual
acceptor negotiation as the node configures it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from dicomnode import conformance

DOC = ROOT / "docs" / "conformance.md"


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- BEGIN GENERATED: {name} -->\n(.*?)<!-- END GENERATED: {name} -->",
                  text, re.S)
    assert m, f"block {name} missing"
    return m.group(1)


def test_statement_agrees_with_the_code() -> None:
    lines = conformance.diff(DOC)
    assert not lines, ("docs/conformance.md disagrees with the code; run scripts/gen-conformance:\n"
                       + "".join(lines[:80]))


def test_check_command_passes_and_catches_a_stale_table(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dicomnode.conformance", "--check"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = DOC.read_text(encoding="utf-8")
    # a SOP class row deleted by hand, a transfer syntax claimed decodable that is not
    stale = text.replace("| 1.2.840.10008.5.1.4.1.1.2 | CT Image Storage | SCP |\n", "", 1)
    stale = stale.replace("MPEG2 Main Profile / Main Level | yes | no (stored only)",
                          "MPEG2 Main Profile / Main Level | yes | yes", 1)
    assert stale != text
    copy = tmp_path / "conformance.md"
    copy.write_text(stale, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "dicomnode.conformance", "--check", "--file",
                          str(copy)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    assert "+| 1.2.840.10008.5.1.4.1.1.2 | CT Image Storage | SCP |" in out.stdout
    assert "MPEG2 Main Profile / Main Level | yes | yes" in out.stdout


def test_every_block_must_be_there_once() -> None:
    text = DOC.read_text(encoding="utf-8")
    broken = re.sub(r"<!-- BEGIN GENERATED: dicomweb -->.*?<!-- END GENERATED: dicomweb -->",
                    "", text, flags=re.S)
    with pytest.raises(ValueError, match="missing \\['dicomweb'\\]"):
        conformance.regenerate(broken)


def test_an_undocumented_route_or_status_stops_the_generator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    web = dict(conformance._WEB)
    del web[("/readyz", "GET")]
    monkeypatch.setattr(conformance, "_WEB", web)
    with pytest.raises(RuntimeError, match="GET /readyz is not described"):
        conformance.dicomweb()
    from dicomnode.core.status import Status
    from dicomnode.ingest import admission

    answers = dict(admission.ANSWERS)
    del answers[Status.NOT_AUTHORIZED]
    monkeypatch.setattr(admission, "ANSWERS", answers)
    with pytest.raises(RuntimeError, match="NOT_AUTHORIZED"):
        conformance.statuses()


def test_listed_sop_classes_and_syntaxes_are_accepted_by_the_negotiation() -> None:
    """What the SCP table claims is what pynetdicom's unrestricted acceptor does."""
    from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

    text = DOC.read_text(encoding="utf-8")
    classes = re.findall(r"^\| ([0-9.]+) \| [^|]+ \| SCP \|$", _block(text, "scp-storage"), re.M)
    syntaxes = re.findall(r"^\| ([0-9.]+) \| [^|]+ \| yes \|", _block(text, "transfer-syntaxes"),
                          re.M)
    assert len(classes) > 100 and len(syntaxes) > 30
    private = "1.3.6.1.4.1.9590.100.1.2.999"  # a private SOP class: accepted too
    contexts = []
    for i, uid in enumerate([*classes[1:], private]):
        cx = PresentationContext()
        cx.context_id = 2 * (i % 127) + 1
        cx.abstract_syntax = uid
        cx.transfer_syntax = [syntaxes[i % len(syntaxes)], syntaxes[0]]
        contexts.append(cx)
    for start in range(0, len(contexts), 127):
        batch = contexts[start:start + 127]
        accepted, _roles = negotiate_unrestricted(batch, [])
        assert [a.result for a in accepted] == [0] * len(batch)
        # the first proposed transfer syntax is the one accepted (stored as sent)
        assert [a.transfer_syntax[0] for a in accepted] == [b.transfer_syntax[0] for b in batch]
