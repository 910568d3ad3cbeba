"""The config file and the command line: `config check`, `serve` with a bad or no
config, and `status` in text and JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import echoscu, free_port, make_series, run_cli, storescu

GOOD = {
    "ae_title": "DICOMNODE",
    "bind_address": "127.0.0.1",
    "port": 11112,
    "storage": "data",
    "allowed_callers": [{"ae_title": "CT1", "host": "10.1.2.0/24"}],
    "completion": {"quiet_seconds": 5, "on_association_release": True},
    "ingest": {"processes": 2},
}

# (what is wrong, the settings, the field the message must name, words it must contain)
BAD = [
    ("port", {"port": 70000}, "port", ["65535", "70000"]),
    ("unknown field", {"colour": "blue"}, "colour", ["unknown field"]),
    ("nested unknown field", {"completion": {"quiet_secs": 3}}, "completion.quiet_secs",
     ["unknown field"]),
    ("AE title too long", {"ae_title": "A" * 17}, "ae_title", ["17", "16"]),
    ("quiet_seconds negative", {"completion": {"quiet_seconds": -1}},
     "completion.quiet_seconds", ["greater than 0", "-1"]),
    ("caller host", {"allowed_callers": [{"ae_title": "CT1", "host": "not-an-ip"}]},
     "allowed_callers.0.host", ["not-an-ip", "not an IP address"]),
    ("processes", {"ingest": {"processes": 0}}, "ingest.processes", ["greater than or equal to 1"]),
    ("bind address", {"bind_address": "localhost"}, "bind_address", ["not an IP address"]),
]


def _write(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **settings}))
    return path


def test_config_check_good(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    r = run_cli("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "DICOMNODE" in r.stdout


def test_config_check_empty_file_uses_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    r = run_cli("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert "11112" in r.stdout


@pytest.mark.parametrize("what,settings,field,words", BAD, ids=[b[0] for b in BAD])
def test_config_check_bad(tmp_path: Path, what: str, settings: dict[str, Any], field: str,
                          words: list[str]) -> None:
    path = _write(tmp_path, settings)
    r = run_cli("config", "check", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(path) in r.stderr
    line = next((ln for ln in r.stderr.splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, f"no line naming {field!r}:\n{r.stderr}"
    for word in words:
        assert word in line, f"{word!r} missing from {line!r}"
    assert "Traceback" not in r.stderr


def test_config_check_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("ae_title: DICOMNODE\ncompletion:\n  quiet_seconds: [1, 2\n")
    r = run_cli("config", "check", str(path))
    assert r.returncode == 2
    assert "not valid YAML" in r.stderr and "line " in r.stderr
    assert "Traceback" not in r.stderr


def test_config_check_missing_file(tmp_path: Path) -> None:
    r = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_config_check_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    r = run_cli("config", "check", str(path))
    assert r.returncode == 2
    assert "mapping" in r.stderr


def test_serve_with_bad_config_exits_2_without_starting(tmp_path: Path) -> None:
    port = free_port()
    path = _write(tmp_path, {"port": port, "storage": str(tmp_path / "data"),
                             "completion": {"quiet_seconds": -1}})
    r = run_cli("serve", "--config", str(path), timeout=60)
    assert r.returncode == 2
    assert "completion.quiet_seconds" in r.stderr
    assert "ready on" not in r.stderr
    assert not (tmp_path / "data").exists()
    assert echoscu(port).returncode != 0


def test_serve_without_config_file(tmp_path: Path) -> None:
    """Embedded defaults plus command-line overrides; SIGTERM stops it with exit 0."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = free_port()
    storage = tmp_path / "store"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--port", str(port), "--bind",
             "127.0.0.1", "--storage", str(storage)],
            cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while b"ready on" not in log.read_bytes():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert echoscu(port).returncode == 0
            files = make_series(tmp_path / "s", n=2, size=16)
            assert storescu(port, files).returncode == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (storage / "index.sqlite3").exists()
    assert len(list((storage / "studies").rglob("*.dcm"))) == 2
    assert not (cwd / "dicomnode-data").exists()  # the default storage was overridden
    assert f"DICOMNODE ready on 127.0.0.1:{port}" in log.read_text()


def test_status_text_and_json(node: Any, tmp_path: Path) -> None:
    r = run_cli("status", "--config", str(node.config_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no studies"

    files = make_series(tmp_path / "s", n=3, size=16)
    assert storescu(node.port, files).returncode == 0
    r = run_cli("status", "--config", str(node.config_path), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["storage"] == str(node.storage)
    (study,) = data["studies"]
    assert study["instances"] == 3 and study["calling_ae"] == "STORESCU"
    assert study["state"] in ("receiving", "complete")
    (series,) = study["series"]
    assert series["instances"] == 3
    assert series["sop_classes"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert series["transfer_syntaxes"] == ["1.2.840.10008.1.2.1"]

    r = run_cli("status", "--storage", str(node.storage))
    assert r.returncode == 0, r.stderr
    assert f"study {study['study_uid']}" in r.stdout
    assert "3 instances" in r.stdout and "from STORESCU" in r.stdout
    assert f"series {series['series_uid']}  3 instances" in r.stdout


def test_status_without_index(tmp_path: Path) -> None:
    r = run_cli("status", "--storage", str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert "no index" in r.stderr
