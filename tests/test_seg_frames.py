"""The fast SEG assembly (dicomnode/encode/seg_frames.py) makes highdicom's SEG.

For each case the SEG is encoded twice, by ``encode_seg`` (highdicom on two slices,
expanded to the series) and by highdicom on the whole series, both are written and read
back, and every data element is compared, nested items included, except what highdicom
makes anew on every call (creation and content date/time, the contribution date/time,
the Dimension Organization UID). Cases: the real chest CT, one and two segments, label
values that are not segment numbers, a revision that replaces an earlier SEG, a frame
size that is not a multiple of 8 pixels, feet-first (slices sorted the other way), and
the series the fast path leaves to highdicom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import ROOT, dicom_files, shared

from dicomnode.core.manifest import Manifest, load_manifest
from dicomnode.encode import seg as seg_module
from dicomnode.encode import seg_frames
from dicomnode.encode.base import EncodeInput
from dicomnode.encode.validate import check_object
from dicomnode.inference.volume import load_series
from dicomnode.synthetic import make_ct_series

VOLATILE = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
            "ContributionDateTime", "DimensionOrganizationUID"}


def _differences(a: pydicom.Dataset, b: pydicom.Dataset, path: str = "") -> list[str]:
    out = []
    for tag in sorted(set(a.keys()) ^ set(b.keys())):
        out.append(f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}: only in one")
    for tag in sorted(set(a.keys()) & set(b.keys())):
        ea, eb = a[tag], b[tag]
        name = path + (pydicom.datadict.keyword_for_tag(tag) or str(tag))
        if ea.keyword in VOLATILE:
            continue
        if ea.VR != eb.VR:
            out.append(f"{name}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{name}: {len(ea.value)} items != {len(eb.value)}")
                continue
            for i, (x, y) in enumerate(zip(ea.value, eb.value, strict=True)):
                out.extend(_differences(x, y, f"{name}[{i}]."))
        elif ea.value != eb.value:
            out.append(f"{name}: {str(ea.value)[:50]!r} != {str(eb.value)[:50]!r}")
    return out


def _input(paths: list[Path], manifest: Manifest, labels_fn: Any, **kw: Any) -> EncodeInput:
    volume = load_series(paths)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    return EncodeInput(source_paths=tuple(by_uid[u] for u in volume.sop_instance_uids),
                       labels=labels_fn(volume.shape), manifest=manifest, measurements={},
                       study_uid=volume.study_uid, series_uid=volume.series_uid, **kw)


def _both(inp: EncodeInput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """(expanded, highdicom whole), each written and read back."""
    expanded = seg_module.encode_seg(inp)
    assert seg_module.plan_seg(inp) is not None, "the fast path did not apply"
    with monkeypatch.context() as m:
        m.setattr(seg_frames, "read_refs", lambda paths: None)
        whole = seg_module.encode_seg(inp)
    expanded.save_as(tmp_path / "expanded.dcm", enforce_file_format=True)
    whole.save_as(tmp_path / "whole.dcm", enforce_file_format=True)
    return pydicom.dcmread(tmp_path / "expanded.dcm"), pydicom.dcmread(tmp_path / "whole.dcm")


def _blobs(shape: tuple[int, int, int], values: tuple[int, ...] = (1, 2)) -> np.ndarray:
    n, rows, cols = shape
    lab = np.zeros(shape, dtype=np.uint8)
    lab[1:n - 1, rows // 5:rows // 2, cols // 6:cols // 3] = values[0]
    if len(values) > 1:
        lab[n // 3:, rows // 2:rows - 3, cols // 2:cols - 5] = values[1]
    return lab


@pytest.fixture(scope="module")
def lung() -> Manifest:
    return load_manifest(ROOT / "models" / "lung_density")


def test_real_chest_ct_two_segments(lung: Manifest, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    paths = dicom_files(shared("tcia-lung-pet-ct-dx", "Lung_Dx-A0001", "CT_chest_5mm_kernelB"))
    inp = _input(paths, lung, _blobs)
    expanded, whole = _both(inp, tmp_path, monkeypatch)
    assert _differences(expanded, whole) == []
    assert int(expanded.NumberOfFrames) == 2 * len(paths)
    assert check_object(tmp_path / "expanded.dcm") == []  # read back + dciodvfy


@pytest.mark.parametrize("case", ["one segment", "label values", "revision", "odd size",
                                  "feet first"])
def test_synthetic_cases(case: str, lung: Manifest, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, values, kw = lung, (1, 2), {}
    rows = cols = 30 if case == "odd size" else 64  # 900 pixels: frames share bytes
    thickness = -2.0 if case == "feet first" else 2.0
    if case == "one segment":
        manifest = Manifest.model_validate({**lung.model_dump(), "labels": [lung.labels[0].model_dump()]})
        values = (1,)
    elif case == "label values":
        labels = [lab.model_dump() for lab in lung.labels]
        labels[0]["value"], labels[1]["value"] = 7, 3
        manifest = Manifest.model_validate({**lung.model_dump(), "labels": labels})
        values = (7, 3)
    elif case == "revision":
        kw = {"revision": 2, "replaces": {"seg": ("2.25.12345",)}}
    paths = make_ct_series(tmp_path / "src", 9, rows, cols, slice_thickness=abs(thickness), seed=5)
    if case == "feet first":  # positions decrease with the instance number
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.ImagePositionPatient[2] = -float(ds.ImagePositionPatient[2])
            ds.PatientPosition = "FFS"
            ds.save_as(p, enforce_file_format=True)
    inp = _input(paths, manifest, lambda shape: _blobs(shape, values), **kw)
    expanded, whole = _both(inp, tmp_path, monkeypatch)
    assert _differences(expanded, whole) == []
    if case == "one segment":
        assert expanded.DimensionOrganizationType == "3D"
    assert check_object(tmp_path / "expanded.dcm") == []


def test_what_the_fast_path_leaves_to_highdicom(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", 3, 16, 16, seed=1)
    refs = seg_frames.read_refs(paths)
    assert refs is not None and seg_frames.eligible(refs) == ""
    assert seg_frames.eligible(refs[:1]) == "fewer than two source instances"
    other = dataclasses.replace(refs[1], series="2.25.9")
    assert "differ" in seg_frames.eligible([refs[0], other])
    tilted = dataclasses.replace(refs[1], orientation=(1.0, 0.0, 0.0, 0.0, 0.9, 0.1))
    assert "orientation" in seg_frames.eligible([refs[0], tilted])
    multi = dataclasses.replace(refs[0], frames="4")
    assert seg_frames.eligible([multi, refs[1]]) == "multi-frame source"
    # a file the walker cannot read (deflated): pydicom and highdicom take the series
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert seg_frames.read_refs([tmp_path / "deflated.dcm", *paths[1:]]) is None


def test_pack_frames_matches_per_frame_packing() -> None:
    rng = np.random.default_rng(0)
    for shape in ((5, 16, 16), (40, 8, 24), (3, 5, 7)):
        segments = rng.integers(0, 3, size=shape).astype(np.uint8)
        order = rng.permutation(shape[0])
        got = seg_frames.pack_frames(segments, order, 2)
        bits = np.concatenate([(segments[order] == s).ravel() for s in (1, 2)])
        want = np.packbits(bits, bitorder="little").tobytes()
        assert got == want + (b"0" if len(want) % 2 else b"")  # highdicom's padding
        for order_ in (np.arange(shape[0]), np.arange(shape[0])[::-1]):
            bits = np.concatenate([(segments[order_] == s).ravel() for s in (1, 2)])
            want = np.packbits(bits, bitorder="little").tobytes()
            assert seg_frames.pack_frames(segments, order_, 2)[:len(want)] == want


def test_a_plan_made_before_the_labels_gives_the_same_seg(
        lung: Manifest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = make_ct_series(tmp_path / "src", 6, 32, 32, seed=2)
    inp = _input(paths, lung, _blobs)
    # what the worker does while the model runs: no labels yet
    plan = seg_module.plan_seg(dataclasses.replace(inp, labels=np.zeros((0, 0, 0), np.uint8)))
    assert plan is not None
    planned = seg_module.encode_seg(inp, plan)
    assert plan.used and planned is plan.seg
    fresh = seg_module.encode_seg(inp)
    planned.save_as(tmp_path / "planned.dcm", enforce_file_format=True)
    fresh.save_as(tmp_path / "fresh.dcm", enforce_file_format=True)
    assert _differences(pydicom.dcmread(tmp_path / "planned.dcm"),
                        pydicom.dcmread(tmp_path / "fresh.dcm")) == []
    # used once; and a plan of another input is not used
    again = seg_module.encode_seg(inp, plan)
    assert again is not plan.seg
    other = seg_module.plan_seg(dataclasses.replace(inp, revision=2))
    assert other is not None
    assert seg_module.encode_seg(inp, other) is not other.seg
    assert "does not fit" in caplog.text
