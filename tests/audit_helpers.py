"""Reading a test node's audit trail back through the CLI, as an auditor would."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from conftest import run_cli

TRANSFERRED = "DICOM Instances Transferred"


def export(node: Any) -> list[dict[str, Any]]:
    """``dicomnode audit export --format json`` of the node's trail (every chain)."""
    out = run_cli("audit", "export", "--format", "json", "--config", str(node.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    return list(json.loads(out.stdout))


def event_name(record: dict[str, Any]) -> str:
    return str(record["event"]["EventIdentification"]["EventID"]["originalText"])


def transferred(records: list[dict[str, Any]]) -> Counter[str]:
    """Instances recorded as transferred, per study (summed over every record)."""
    counts: Counter[str] = Counter()
    for r in records:
        if event_name(r) != TRANSFERRED:
            continue
        for o in r["event"]["ParticipantObjectIdentification"]:
            for s in (o.get("ParticipantObjectDescription") or {}).get("SOPClass", []):
                counts[o["ParticipantObjectID"]] += int(s["NumberOfInstances"])
    return counts


def verify(node: Any) -> str:
    """``dicomnode audit verify``; asserts it passes and returns its output."""
    out = run_cli("audit", "verify", "--config", str(node.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "audit trail OK" in out.stdout, out.stdout
    return out.stdout
