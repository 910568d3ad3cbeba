"""TorchScript runtime: a scripted/traced segmentation network in the model folder.

The manifest names the file (``weights: model.ts``); it is loaded once with
``torch.jit.load(map_location=device)``, put in eval mode and kept there (warm).
Each ``predict`` feeds ``Volume.array`` ``(k, i, j)`` as a ``(1, 1, k, i, j)`` float
tensor (so the network must have been trained on that layout: slice axis first,
then rows, then columns, with no reorientation or resampling; a network trained on
MONAI-loaded ``(x, y, z)`` RAS volumes belongs in a MONAI bundle, whose runtime hands
the volume over as MONAI's readers would), optionally windowed to ``[0, 1]`` by
``manifest.intensity_window``, run whole or, when ``manifest.patch_size`` is set, by
MONAI's ``sliding_window_inference`` (overlap 0.25, constant blending: the defaults
of ``monai.inferers.SlidingWindowInferer``), under ``torch.inference_mode`` and, on
CUDA when ``manifest.mixed_precision`` allows (the default), ``torch.autocast``
(float16). Output channel ``c`` becomes label value ``c`` of the manifest; channels the
manifest does not name become background. Under the worker's scheduler the window
batches pass through :mod:`dicomnode.inference.execution` (preemption by STAT jobs, a
smaller batch after an out-of-memory error).

The small helpers at the top are shared with the MONAI bundle runtime.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.errors import ConfigError
from dicomnode.inference import execution
from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtime import ModelRuntime, Prediction

if TYPE_CHECKING:  # torch is imported lazily: nothing heavy at import time
    import torch

logger = logging.getLogger(__name__)

#: MONAI SlidingWindowInferer defaults, used when only ``manifest.patch_size`` is given.
SW_OVERLAP = 0.25
SW_BATCH_SIZE = 4


# --------------------------------------------------------------------------- helpers


def file_in_model_dir(model_dir: Path, relative: str, what: str) -> Path:
    """``model_dir / relative``, refusing paths that leave the folder or do not exist.

    Raises :class:`ConfigError` naming ``what`` (the manifest field or bundle part).
    """
    root = Path(model_dir).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(str(model_dir), [(what, f"{relative!r} is outside the model folder")])
    if not path.is_file():
        raise ConfigError(str(model_dir), [(what, f"file not found: {relative}")])
    return path


def check_device(model_dir: Path, device: str) -> None:
    """Raise :class:`ConfigError` when ``device`` is CUDA and CUDA is not usable."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(str(model_dir), [("device", f"{device!r} asked for, CUDA not available")])


def autocast(device: str, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision (float16) on CUDA where ``enabled`` (the manifest's
    ``mixed_precision``); a no-op elsewhere."""
    import torch

    if enabled and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def volume_tensor(volume: Volume, device: str) -> torch.Tensor:
    """``Volume.array`` ``(k, i, j)`` as a float32 ``(1, k, i, j)`` channel-first tensor."""
    import torch

    arr = np.ascontiguousarray(volume.array, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"volume.array must be 3-D (k, i, j), got shape {arr.shape}")
    return torch.from_numpy(arr)[None].to(device)


def first_output(out: Any) -> torch.Tensor:
    """The logits tensor of a network output (deep-supervision tuples/dicts: the first)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def channel_lookup(
    manifest: Manifest,
    num_channels: int,
    source: str,
    channel_names: dict[int, str] | None = None,
) -> np.ndarray:
    """A lookup table ``lut[channel] -> label value`` (uint8) for an argmax map.

    Channel 0 is background. When ``channel_names`` are given and any manifest label
    name equals one of them (case-insensitive), channels map by name only: channel
    ``c`` to the label named ``channel_names[c]``. Otherwise channel ``c >= 1`` maps
    to the label whose value is ``c``. Other channels become background (logged once).
    Raises :class:`ConfigError` when a manifest label gets no channel.
    """
    by_name = {label.name.casefold(): label.value for label in manifest.labels}
    by_value = {label.value for label in manifest.labels}
    names = {c: n.casefold() for c, n in (channel_names or {}).items()}
    use_names = any(n in by_name for c, n in names.items() if c >= 1)
    lut = np.zeros(num_channels, dtype=np.uint8)
    ignored: list[str] = []
    for c in range(1, num_channels):
        if use_names and names.get(c) in by_name:
            lut[c] = by_name[names[c]]
        elif not use_names and c in by_value:
            lut[c] = c
        else:
            ignored.append(f"{c} ({names[c]})" if c in names else str(c))
    if ignored:
        logger.info("%s: output channel(s) without a manifest label, taken as background: %s",
                    source, ", ".join(ignored))
    missing = sorted(by_value - set(int(v) for v in lut[1:]))
    if missing:
        raise ConfigError(
            source,
            [
                (
                    "labels",
                    f"label value(s) {missing} have no output channel (network has {num_channels})",
                )
            ],
        )
    return lut


def measure(
    labels: np.ndarray, manifest: Manifest, voxel_volume_ml: float
) -> dict[str, dict[str, tuple[float, str]]]:
    """Per-label and total volume (``ml``) and voxel count (``{voxels}``), UCUM units."""
    counts = np.bincount(labels.ravel(), minlength=256)
    out: dict[str, dict[str, tuple[float, str]]] = {}
    total = 0
    for label in manifest.labels:
        n = int(counts[label.value])
        total += n
        out[label.name] = {
            "volume": (n * voxel_volume_ml, "ml"),
            "voxel_count": (float(n), "{voxels}"),
        }
    out["total"] = {
        "volume": (total * voxel_volume_ml, "ml"),
        "voxel_count": (float(total), "{voxels}"),
    }
    return out


def run_network(
    x: torch.Tensor,
    infer: Callable[[torch.Tensor], Any],
    device: str,
    amp: bool = True,
) -> tuple[np.ndarray, int]:
    """Run ``infer`` on a ``(1, C, k, i, j)`` input, under autocast on CUDA if ``amp``.

    Returns the argmax channel map ``(k, i, j)`` on the CPU and the number of channels.
    """
    import torch

    with torch.inference_mode(), autocast(device, amp):
        logits = first_output(infer(x))
    if logits.ndim != 5 or logits.shape[0] != 1 or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
        raise ValueError(
            f"network output shape {tuple(logits.shape)} does not match input {tuple(x.shape)}"
        )
    channels = logits.shape[1]
    if channels < 2:
        raise ValueError(
            f"network output has {channels} channel(s); argmax needs background + labels"
        )
    arg = torch.argmax(logits, dim=1)[0]
    return arg.to(torch.uint8 if channels <= 256 else torch.int64).cpu().numpy(), channels


# --------------------------------------------------------------------------- runtime


class TorchScriptRuntime(ModelRuntime):
    """Runs a TorchScript segmentation network named by ``manifest.weights``."""

    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        super().__init__(manifest, model_dir, device)
        self._module: Any = None
        self._lut: np.ndarray | None = None

    def load(self) -> None:
        """Load ``manifest.weights`` onto ``self.device`` once, in eval mode."""
        import torch

        if self.manifest.weights is None:
            raise ConfigError(
                str(self.model_dir), [("weights", "required for runtime 'torchscript'")]
            )
        check_device(self.model_dir, self.device)
        path = file_in_model_dir(self.model_dir, self.manifest.weights, "weights")
        try:
            module = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                str(self.model_dir),
                [("weights", f"{self.manifest.weights}: not a TorchScript file ({exc})")],
            ) from None
        module.eval()
        self._module = module
        logger.info(
            "loaded TorchScript model %s %s from %s on %s",
            self.manifest.name,
            self.manifest.version,
            path.name,
            self.device,
        )

    def _prepare(self, volume: Volume) -> torch.Tensor:
        x = volume_tensor(volume, self.device)
        if self.manifest.intensity_window is not None:
            lo, hi = self.manifest.intensity_window
            x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)
        return x[None]

    def _infer(self, x: torch.Tensor) -> Any:
        if self.manifest.patch_size is None:
            return self._module(x)
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x,
            roi_size=self.manifest.patch_size,
            sw_batch_size=execution.window_batch(SW_BATCH_SIZE),
            predictor=execution.guard(self._module),  # the scheduler's preemption point
            overlap=SW_OVERLAP,
        )

    def predict(self, volume: Volume) -> Prediction:
        """Segment one volume; labels in the volume's (k, i, j) grid."""
        if self._module is None:
            raise RuntimeError("TorchScriptRuntime.predict() called before load()")
        start = time.perf_counter()
        arg, channels = run_network(self._prepare(volume), self._infer, self.device,
                                    self.manifest.mixed_precision)
        if self._lut is None or len(self._lut) != channels:
            self._lut = channel_lookup(self.manifest, channels, str(self.model_dir))
        return make_prediction(self._lut[arg], self.manifest, volume, self.device, start)


def make_prediction(labels: np.ndarray, manifest: Manifest, volume: Volume, device: str,
                    start: float) -> Prediction:
    """Wrap a label map as the runtime's Prediction, with per-label volumes (both runtimes)."""
    seconds = time.perf_counter() - start
    logger.info("%s: %s in %.2f s on %s", manifest.name, volume.shape, seconds, device)
    return Prediction(
        labels=labels,
        measurements=measure(labels, manifest, volume.voxel_volume_ml),
        model_name=manifest.name,
        model_version=manifest.version,
        device=device,
        seconds=seconds,
    )
