"""Stand-in networks whose output is a known function of their input, for bundle tests.

They are plugged into real MONAI model-zoo configs in place of the zoo's networks
(whose weights the project does not have) so that a test can say exactly which label
every voxel must get after the bundle's own orientation, resampling and inversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ThresholdNet(nn.Module):
    """Classes by intensity: argmax = how many ``thresholds`` the input exceeds.

    A 1x1x1 convolution: logit_c = gain * (c * x - sum(thresholds[:c])), so
    logit_c - logit_(c-1) = gain * (x - thresholds[c-1]); with increasing
    thresholds the argmax is the count of thresholds below x.
    """

    def __init__(self, thresholds: Sequence[float], gain: float = 50.0) -> None:
        super().__init__()
        t = [float(v) for v in thresholds]
        if t != sorted(t) or not t:
            raise ValueError("thresholds must be a non-empty increasing sequence")
        self.conv = nn.Conv3d(1, len(t) + 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(
                gain * torch.arange(len(t) + 1, dtype=torch.float32).view(-1, 1, 1, 1, 1)
            )
            self.conv.bias.copy_(gain * -torch.tensor([sum(t[:c]) for c in range(len(t) + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AxisNet(nn.Module):
    """Which network axis the intensity increases along: class a + 1 for axis a.

    Channel 0 is the constant ``floor``; channel a + 1 is ``gain`` times the central
    difference of the input along spatial axis a (replicate padding). The argmax is
    the axis with the steepest increase, or 0 where nothing increases by more than
    ``floor / gain`` per voxel.
    """

    def __init__(self, floor: float = 1.0, gain: float = 100.0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, kernel_size=3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.bias[0] = floor
            for axis in range(3):
                lo, hi = [1, 1, 1], [1, 1, 1]
                lo[axis], hi[axis] = 0, 2
                self.conv.weight[axis + 1, 0, lo[0], lo[1], lo[2]] = -gain / 2
                self.conv.weight[axis + 1, 0, hi[0], hi[1], hi[2]] = gain / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ------------------------------------------------------------------ probe bundles

ZOO = ("spleen_ct_segmentation", "wholeBody_ct_segmentation", "lung_nodule_ct_detection")
_CATEGORY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
_TYPE = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}


def manifest_for(names: Sequence[str], version: str = "0.0.0") -> dict[str, object]:
    """A manifest dict naming labels 1..N after ``names`` (one code for all: a probe)."""
    return {
        "name": "probe",
        "version": version,
        "runtime": "monai_bundle",
        "labels": [
            {"value": v, "name": n, "category": _CATEGORY, "type": _TYPE}
            for v, n in enumerate(names, start=1)
        ],
        "accepts": {"modalities": ["CT", "MR"]},
    }


def probe_bundle(zoo_dir: object, dest: object, network: nn.Module,
                 network_def: dict[str, object], channel_names: Sequence[str]) -> object:
    """Copy a zoo bundle's configs to ``dest`` with ``network`` in place of its own.

    Everything else in ``inference.json`` (pre/postprocessing, inferer) is the zoo's.
    Writes ``models/model.pt`` (the probe's state dict), ``metadata.json`` with the
    probe's channels and a ``manifest.yaml``. Returns the folder (a Path).
    """
    import json
    import shutil
    from pathlib import Path

    import yaml

    src, out = Path(str(zoo_dir)), Path(str(dest))
    shutil.copytree(src / "configs", out / "configs")
    config_path = out / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["network_def"] = network_def
    config_path.write_text(json.dumps(config, indent=1))
    meta_path = out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    pred = next(iter(meta["network_data_format"]["outputs"].values()))
    pred["num_channels"] = len(channel_names) + 1
    pred["channel_def"] = {str(c): n for c, n in enumerate(["background", *channel_names])}
    meta_path.write_text(json.dumps(meta, indent=1))
    (out / "models").mkdir()
    torch.save(network.state_dict(), out / "models" / "model.pt")
    manifest = manifest_for(channel_names, version=str(meta.get("version", "0.0.0")))
    (out / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return out
