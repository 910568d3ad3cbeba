"""Every benchmark still runs: each bench/ script in its ``--smoke`` mode.

A smoke run is the real script (its receivers, baselines, node, PACS and report) on a
few tiny synthetic instances with one repeat and no real data. It is run as a
subprocess, must exit 0, and its JSON report must have the structure the full run
reports: the comparison against its baselines (ratios) and positive figures. Nothing
here judges a speed. Where a baseline program is missing, the script skips that part
with a message; the tests then check that message instead of the baseline's figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import need_tool

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TIMEOUT_S = 240


def run_bench(script: str, out: Path, *args: str, env: dict[str, str] | None = None
              ) -> tuple[dict[str, Any], str]:
    """Run ``bench/<script> --smoke --out <out> ARGS``; returns (its JSON report, its output)."""
    environ = dict(env if env is not None else os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench/{script} --smoke exited {proc.returncode}:\n{output[-4000:]}"
    assert out.is_file(), f"bench/{script} --smoke wrote no report:\n{output[-2000:]}"
    return json.loads(out.read_text()), output


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and value > 0


def path_without(tmp_path: Path, *keep: str) -> dict[str, str]:
    """An environment whose PATH offers only ``keep`` (as links), so other tools are missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in keep:
        (bin_dir / tool).symlink_to(need_tool(tool))
    return {**os.environ, "PATH": str(bin_dir)}


# -- ingest: dicomnode against storescp and Orthanc -------------------------------------


def _check_ingest(report: dict[str, Any], expect_baselines: set[str]) -> None:
    assert report["settings"]["smoke"] is True
    runs = report["runs"]
    assert runs and all(r["ok"] for r in runs), [r["problems"] for r in runs if not r["ok"]]
    assert all(r["stored"] == r["instances"] for r in runs)
    receivers = {(s["associations"], s["receiver"]) for s in report["summary"]}
    assert {(1, "dicomnode p=1"), (4, "dicomnode p=4")} <= receivers
    for s in report["summary"]:
        assert s["runs"] == 1 and s["failed_runs"] == 0
        assert positive(s["instances_per_s"]) and positive(s["mb_per_s"]), s
        assert positive(s["peak_rss_mb"]), s
    # the comparison: one ratio per baseline present, positive
    compared = {t["what"].split(" / ")[1].split(",")[0] for t in report["targets"]}
    assert compared == expect_baselines
    assert all(positive(t["value"]) for t in report["targets"])


def test_ingest_smoke(tmp_path: Path) -> None:
    need_tool("storescu")
    need_tool("echoscu")
    report, output = run_bench("ingest.py", tmp_path / "ingest.json")
    missing = set(report["settings"]["skipped_baselines"])
    expected = {"storescp", "storescp --fork", "orthanc"}
    if "storescp" in missing:
        expected -= {"storescp", "storescp --fork"}
    if "orthanc" in missing:
        expected -= {"orthanc"}
    _check_ingest(report, expected)
    assert "vs storescp" in output and "Targets" in output or not expected


def test_ingest_smoke_without_baselines(tmp_path: Path) -> None:
    """storescp and Orthanc missing: skipped with a message, dicomnode still measured."""
    env = path_without(tmp_path, "storescu", "echoscu")
    report, output = run_bench("ingest.py", tmp_path / "ingest.json", env=env)
    assert "skipping the storescp baseline: storescp is not installed" in output
    assert "skipping the orthanc baseline: Orthanc is not installed" in output
    assert report["settings"]["skipped_baselines"] == ["orthanc", "storescp"]
    _check_ingest(report, set())


# -- STOW-RS against C-STORE ------------------------------------------------------------


def test_stow_smoke(tmp_path: Path) -> None:
    need_tool("storescu")
    report, output = run_bench("stow.py", tmp_path / "stow.json")
    (result,) = report["results"]
    assert result["instances"] == 6
    assert set(result["instances_per_s"]) == {"C-STORE", "STOW-RS"}
    assert all(positive(v) for v in result["instances_per_s"].values())
    assert positive(result["stow_over_cstore"])
    assert "STOW-RS / C-STORE = " in output


def test_stow_smoke_without_storescu(tmp_path: Path) -> None:
    report, output = run_bench("stow.py", tmp_path / "stow.json", env=path_without(tmp_path))
    assert "skipping the C-STORE baseline: storescu (DCMTK) is not installed" in output
    (result,) = report["results"]
    assert list(result["instances_per_s"]) == ["STOW-RS"] and result["stow_over_cstore"] is None
    assert positive(result["instances_per_s"]["STOW-RS"])


# -- end to end: node -> lung_density -> SEG + SR in Orthanc ------------------------------


def test_e2e_smoke(tmp_path: Path) -> None:
    for tool in ("storescu", "echoscu", "Orthanc"):
        need_tool(tool)
    report, output = run_bench("e2e.py", tmp_path / "e2e.json")
    (run,) = report["runs"]
    assert run["ok"], run["problems"]
    assert run["received_indexed"] == run["instances"] == 24
    results = run["results_indexed"]  # the node's own results, counted apart: one SEG, one SR
    assert results.pop("1.2.840.10008.5.1.4.1.1.66.4") == 1
    assert len(results) == 1 and next(iter(results)).startswith("1.2.840.10008.5.1.4.1.1.88.")
    assert sum(results.values()) == 1
    assert run["seg_uid"] and run["sr_uid"]
    (summary,) = report["summary"]
    assert summary["failed_runs"] == 0 and summary["quiet_s"] == 0.5
    for key in ("send_s", "total_s", "model_s", "load_s"):
        assert positive(summary[key]), (key, summary)
    assert summary["total_s"] > summary["quiet_s"] + summary["model_s"] - 1e-6
    assert abs(summary["overhead_s"] - (summary["total_s"] - 0.5 - summary["model_s"])) < 1e-6
    for name in ("completion (quiet + lag)", "load volume + predict",
                 "encode + check SEG and SR", "  of which: SEG encoded+checked",
                 "  of which: SR encoded+checked", "dispatch + C-STORE to PACS"):
        assert positive(summary["segments"][name]), (name, summary["segments"])
    assert "Where the time goes after the last instance" in output


# -- series -> volume against MONAI LoadImage and a pydicom loop -------------------------


def test_volume_smoke(tmp_path: Path) -> None:
    report, output = run_bench("volume.py", tmp_path / "volume.json")
    (result,) = report["results"]
    assert result["slices"] == 8 and result["same_voxels_pydicom_loop"] is True
    methods = {"dicomnode", "pydicom loop", "bytes floor"}
    if "skipping the MONAI LoadImage baseline" not in output:
        methods.add("monai LoadImage")
        assert result["same_voxels_monai"] is True
        assert positive(result["dicomnode_vs_monai"])
    assert set(result["median_s"]) == methods
    assert all(positive(v) for v in result["median_s"].values())


# -- encode: SEG + SR (+ check_object) --------------------------------------------------


def test_encode_smoke(tmp_path: Path) -> None:
    report, output = run_bench("encode.py", tmp_path / "encode.json")
    rows = report["results"]
    assert [r["segments"] for r in rows] == [2, 5]
    for r in rows:
        assert r["frames"] == r["segments"] * r["slices"] == r["segments"] * 8
        assert positive(r["encode_seg_s"]) and positive(r["encode_sr_s"])
        assert positive(r["check_object_s"]) and r["problems"] == []
        assert positive(r["seg_file_mb"])
    if shutil.which("dciodvfy") is None:
        assert "skipping dciodvfy" in output


# -- audit trail against sync-each and raw-file baselines --------------------------------


def test_audit_smoke(tmp_path: Path) -> None:
    report, _ = run_bench("audit.py", tmp_path / "audit.json")
    cases = {r["case"]: r for r in report["results"]}
    assert set(cases) == {
        "group commit, 1 thread", "group commit, 4 threads",
        "baseline: sync=True each record, 1 thread", "baseline: sync=True each record, 4 threads",
        "baseline: raw JSON lines, no crypto/chain, 1 fsync"}
    for r in cases.values():
        assert positive(r["records_per_s"]) and positive(r["disk_bytes_per_record"]), r
    assert cases["group commit, 1 thread"]["records"] == 400
    assert cases["baseline: sync=True each record, 1 thread"]["records"] == 20


# -- the lung model, warm ---------------------------------------------------------------


def test_gpu_smoke(tmp_path: Path) -> None:
    """bench/gpu.py --smoke: the node and the naive MONAI loop on the CPU (no GPU needed)."""
    report, output = run_bench("gpu.py", tmp_path / "gpu.json")
    assert report["device"] == "cpu" and report["settings"]["smoke"] is True
    assert report["problems"] == [], output[-3000:]
    node, naive = report["node"], report["naive"]
    assert [j["state"] for j in node["jobs"]] == ["done", "done"]
    assert all(j["device"] == "cpu" and positive(j["model_seconds"]) for j in node["jobs"])
    for value in (node["studies_per_minute"], node["latency_seconds_median"],
                  naive["studies_per_minute"], report["ratio_node_to_naive"]):
        assert positive(value), report
    assert len(naive["seconds_per_study"]) == 2
    (ratio,) = [t for t in report["targets"] if t["what"].startswith("studies per minute")]
    assert positive(ratio["value"])
    if report["gpu_sampling"].startswith("unavailable"):  # no GPU: nothing sampled
        assert node["busy_fraction"] is None and naive["busy_fraction"] is None


def test_gpu_full_mode_without_a_gpu_skips(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full mode would run")
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out", str(out)], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "no GPU: skipped" in proc.stdout
    assert json.loads(out.read_text()) == {"bench": "gpu", "skipped": "no GPU"}


def test_lung_model_smoke(tmp_path: Path) -> None:
    report, _ = run_bench("lung_model.py", tmp_path / "lung.json")
    (result,) = report["results"]
    assert result["device"] == "cpu" and result["series"].startswith("synthetic (24x")
    assert positive(result["median_s"]) and positive(result["volumes_per_s"])
    assert positive(result["load_series_s"])
    lungs = result["measurements"]
    assert {"right lung", "left lung"} <= set(lungs)
    assert positive(lungs["right lung"]["volume"][0])


# -- QIDO-RS latency and the header scan -----------------------------------------------------


def test_qido_smoke(tmp_path: Path) -> None:
    report, _ = run_bench("qido.py", tmp_path / "qido.json")
    queries = report["queries"]
    assert queries["all studies"]["results"] == report["studies"] == 3
    assert queries["PatientName wildcard"]["results"] == 1  # DOE^JOHN000 only
    assert queries["instances of a study"]["results"] == report["instances_per_study"]
    for q in queries.values():
        assert positive(q["cold_ms"]) and positive(q["warm_ms"]), q
    for h in report["read_header"].values():
        assert positive(h["us_per_call"]) and positive(h["us_per_call_best"]), h
