"""Below the free-disk threshold the node refuses instances with 0xA700, stays up,
and stores nothing; it never deletes anything to make room."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import storescu

from dicomnode.synthetic import make_ct_series


def test_refuses_cleanly_when_the_disk_is_nearly_full(node_factory: Any, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", 3, 32, 32)
    node = node_factory({"retention": {"min_free_gb": 10**9}}).start()  # an exabyte: never met
    out = storescu(node.port, files, extra=["-v"])
    assert "refused: outofresources" in (out.stdout + out.stderr).lower()  # 0xA700
    assert "disk nearly full" in node.log()
    assert not list((node.storage / "studies").rglob("*.dcm"))
    assert node.proc is not None and node.proc.poll() is None  # still up
    assert node.stop() == 0
