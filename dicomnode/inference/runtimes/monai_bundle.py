"""MONAI bundle runtime: a model folder laid out as the MONAI model zoo ships a bundle.

The model folder is the bundle root, with dicomnode's ``manifest.yaml`` beside it::

    models/<name>/
      manifest.yaml            runtime: monai_bundle (name, version, labels with codes)
      configs/inference.json   (or inference.yaml) network_def, inferer, preprocessing
      configs/metadata.json    optional: version, network_data_format (output channels)
      models/model.pt          state dict for network_def ... or
      models/model.ts          TorchScript (network_def then not needed)

``manifest.weights``, when set, names the weights file inside the folder instead
(a ``.ts`` suffix means TorchScript, anything else a state dict).

What is taken from ``inference.json`` (with ``monai.bundle.ConfigParser``;
``bundle_root`` and ``device`` are overridden with the model folder and
``self.device``):

* ``network_def``: instantiated, weights loaded strictly, moved to the device once
  and kept there in eval mode (warm);
* ``inferer``: instantiated as configured (typically ``SlidingWindowInferer`` with
  its ``roi_size``, so volumes larger than the patch are run patch by patch); when
  absent, a sliding window over ``manifest.patch_size`` or the whole volume at once;
* ``preprocessing``: only the intensity transforms (``ScaleIntensityRange(d)``,
  ``NormalizeIntensity(d)``, ``ScaleIntensity(d)``, ``ScaleIntensityRangePercentiles(d)``,
  ``ClipIntensityPercentiles(d)``, ``ThresholdIntensity(d)``) are instantiated and
  applied, in order. Loading/typing transforms are not needed (the volume is already
  an array); spatial ones (``Spacingd``, ``Orientationd``, cropping, ...) are NOT
  applied and are logged as a warning at load;
* ``postprocessing``: the runtime always takes the argmax over output channels (a
  softmax before it changes nothing); a config without an argmax is logged.

Output channel ``c`` maps to the manifest label whose name equals the channel's name
in ``metadata.json`` (``network_data_format.outputs.*.channel_def``), else to the
label with value ``c``.

Axis convention. ``Volume.array`` is ``(k, i, j)`` (slice, row, column; see
:mod:`dicomnode.inference.geometry`) and is fed as a ``(1, 1, k, i, j)`` tensor
(batch, channel, spatial...). MONAI's usual layout is also channel-first, but its
spatial axes come from ``LoadImage`` of a NIfTI file, typically ``(x, y, z)`` after
``Orientationd(axcodes="RAS")``: roughly our axes reversed (column, row, slice) and
flipped from DICOM LPS to RAS. A bundle trained that way sees dicomnode volumes
transposed; this runtime does not reorient, so only bundles trained on the
``(k, i, j)`` layout (like ``models/monai_test_unet``) are consistent.

Bundles are trusted code: ``$`` expressions in a config are evaluated by MONAI and
TorchScript files carry code. Only install bundles you would install as software.
"""

from __future__ import annotations

import json
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
from dicomnode.inference.runtimes.torchscript import (
    channel_lookup,
    check_device,
    file_in_model_dir,
    make_prediction,
    run_network,
    volume_tensor,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS_NAMES = ("models/model.pt", "models/model.ts")

#: Preprocessing transforms applied to the volume (their dictionary forms included).
INTENSITY_TRANSFORMS = frozenset(
    {
        "ScaleIntensityRange",
        "NormalizeIntensity",
        "ScaleIntensity",
        "ScaleIntensityRangePercentiles",
        "ClipIntensityPercentiles",
        "ThresholdIntensity",
    }
)
#: Preprocessing transforms that are moot for an in-memory volume.
MOOT_TRANSFORMS = frozenset(
    {
        "LoadImage",
        "EnsureChannelFirst",
        "AddChannel",
        "EnsureType",
        "ToTensor",
        "ToNumpy",
        "CastToType",
        "ToDevice",
        "Identity",
    }
)


def _base_name(target: object) -> str:
    """``'monai.transforms.ScaleIntensityRanged'`` -> ``'ScaleIntensityRange'``."""
    name = str(target).rsplit(".", 1)[-1]
    return (
        name[:-1]
        if name.endswith("d") and name[:-1] in INTENSITY_TRANSFORMS | MOOT_TRANSFORMS
        else name
    )


class MonaiBundleRuntime(ModelRuntime):
    """Runs a MONAI bundle (``configs/inference.json`` + ``models/model.pt|ts``)."""

    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        super().__init__(manifest, model_dir, device)
        self._network: Any = None
        self._inferer: Callable[..., Any] | None = None
        self._preprocess: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self._channel_names: dict[int, str] = {}
        self._lut: np.ndarray | None = None
        self.bundle_version: str | None = None

    # ------------------------------------------------------------------ loading

    def _error(self, where: str, message: str) -> ConfigError:
        return ConfigError(str(self.model_dir), [(where, message)])

    def _parser(self) -> Any:
        from monai.bundle import ConfigParser

        configs = self.model_dir / "configs"
        config_path = next((configs / n for n in CONFIG_NAMES if (configs / n).is_file()), None)
        if config_path is None:
            raise self._error("configs/inference.json", "missing: not a MONAI bundle folder")
        parser = ConfigParser()
        try:
            parser.read_config(config_path)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise self._error(f"configs/{config_path.name}", f"cannot read: {exc}") from None
        if not isinstance(parser.get(), dict):
            raise self._error(f"configs/{config_path.name}", "not a JSON/YAML object")
        meta_path = configs / "metadata.json"
        if meta_path.is_file():
            try:
                parser.read_meta(meta_path)
            except (OSError, ValueError) as exc:
                raise self._error("configs/metadata.json", f"cannot read: {exc}") from None
        parser["bundle_root"] = str(self.model_dir.resolve())
        parser["device"] = f"$torch.device({self.device!r})"
        return parser

    def _instantiate(self, parser: Any, config_id: str) -> Any:
        try:
            return parser.get_parsed_content(config_id)
        except Exception as exc:  # MONAI raises many kinds; the boundary names the part
            raise self._error(
                f"inference.json: {config_id}", f"cannot instantiate: {exc}"
            ) from None

    def _weights_path(self) -> Path:
        if self.manifest.weights is not None:
            return file_in_model_dir(self.model_dir, self.manifest.weights, "weights")
        for name in WEIGHTS_NAMES:
            if (self.model_dir / name).is_file():
                return file_in_model_dir(self.model_dir, name, "weights")
        raise self._error("models/model.pt", "missing: no models/model.pt or models/model.ts")

    def _load_network(self, parser: Any) -> Any:
        import torch

        path = self._weights_path()
        rel = path.relative_to(self.model_dir.resolve())  # resolved inside the folder
        if path.suffix == ".ts":
            try:
                return torch.jit.load(str(path), map_location=self.device)
            except (RuntimeError, ValueError) as exc:
                raise self._error(str(rel), f"not a TorchScript file ({exc})") from None
        if parser.get("network_def") is None:
            raise self._error("inference.json: network_def", "missing (needed with a state dict)")
        network = self._instantiate(parser, "network_def")
        if not isinstance(network, torch.nn.Module):
            raise self._error(
                "inference.json: network_def", f"is a {type(network).__name__}, not a torch Module"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors of many kinds
            raise self._error(str(rel), f"not a readable state dict ({exc})") from None
        if (
            isinstance(state, dict)
            and len(state) == 1
            and next(iter(state)) in ("model", "state_dict")
        ):
            state = next(iter(state.values()))  # checkpoint saved as {"model": state_dict}
        if not isinstance(state, dict):
            raise self._error(str(rel), f"holds a {type(state).__name__}, not a state dict")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise self._error(str(rel), f"does not fit network_def: {exc}") from None
        return network.to(self.device)

    def _load_inferer(self, parser: Any) -> Callable[..., Any]:
        from monai.inferers import SimpleInferer, SlidingWindowInferer

        if parser.get("inferer") is not None:
            inferer = self._instantiate(parser, "inferer")
            if not callable(inferer):
                raise self._error("inference.json: inferer", "is not callable")
            roi = getattr(inferer, "roi_size", None)
            patch = self.manifest.patch_size
            if patch is not None and roi is not None and tuple(roi) != tuple(patch):
                logger.warning(
                    "%s: manifest patch_size %s ignored, bundle roi_size %s used",
                    self.manifest.name,
                    patch,
                    roi,
                )
            return inferer
        if self.manifest.patch_size is not None:
            return SlidingWindowInferer(
                roi_size=self.manifest.patch_size, sw_batch_size=4, overlap=0.25
            )
        return SimpleInferer()

    def _load_preprocessing(self, parser: Any) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        raw = parser.get("preprocessing")
        if raw is None:
            return []
        if isinstance(raw, dict) and isinstance(raw.get("transforms"), list):
            items, prefix = raw["transforms"], "preprocessing#transforms"
        elif isinstance(raw, list):
            items, prefix = raw, "preprocessing"
        else:
            logger.warning(
                "%s: preprocessing is not a Compose/list; not applied", self.manifest.name
            )
            return []
        out: list[Callable[[torch.Tensor], torch.Tensor]] = []
        for index, item in enumerate(items):
            if (
                not isinstance(item, dict)
                or "_target_" not in item
                or item.get("_disabled_") is True
            ):
                continue
            name = _base_name(item["_target_"])
            if name in MOOT_TRANSFORMS:
                continue
            if name not in INTENSITY_TRANSFORMS:
                logger.warning(
                    "%s: preprocessing %s is not applied by dicomnode (only intensity transforms are)",
                    self.manifest.name,
                    item["_target_"],
                )
                continue
            out.append(self._wrap(self._instantiate(parser, f"{prefix}#{index}")))
            logger.debug("%s: preprocessing %s", self.manifest.name, item["_target_"])
        return out

    @staticmethod
    def _wrap(transform: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """An array transform as is; a dictionary transform applied to its first key."""
        from monai.transforms import MapTransform

        if isinstance(transform, MapTransform):
            keys = tuple(transform.keys)

            def apply(x: torch.Tensor) -> torch.Tensor:
                return transform({k: x for k in keys})[keys[0]]

            return apply
        return transform

    def _read_meta(self, parser: Any) -> None:
        version = parser.get("_meta_#version")
        self.bundle_version = str(version) if version is not None else None
        if self.bundle_version is not None and self.bundle_version != self.manifest.version:
            logger.warning(
                "%s: manifest version %s, bundle metadata version %s",
                self.manifest.name,
                self.manifest.version,
                self.bundle_version,
            )
        outputs = parser.get("_meta_#network_data_format#outputs")
        if not isinstance(outputs, dict) or not outputs:
            return
        first = next(iter(outputs.values()))
        if not isinstance(first, dict):
            return
        try:
            self._channel_names = {
                int(k): str(v) for k, v in (first.get("channel_def") or {}).items()
            }
        except (TypeError, ValueError, AttributeError):
            raise self._error(
                "metadata.json: channel_def", "keys must be channel numbers"
            ) from None
        channels = first.get("num_channels")
        if isinstance(channels, int) and channels >= 2:
            self._lut = channel_lookup(
                self.manifest, channels, str(self.model_dir), self._channel_names
            )

    def load(self) -> None:
        """Read the bundle, put the network on ``self.device`` in eval mode, once."""
        start = time.perf_counter()
        if not self.model_dir.is_dir():
            raise self._error("(folder)", "model folder not found")
        check_device(self.model_dir, self.device)
        parser = self._parser()
        self._read_meta(parser)
        network = self._load_network(parser)
        network.eval()
        inferer = self._load_inferer(parser)
        preprocess = self._load_preprocessing(parser)
        post = json.dumps(parser.get("postprocessing"))
        if parser.get("postprocessing") is not None and "argmax" not in post:
            logger.warning(
                "%s: bundle postprocessing has no argmax; dicomnode takes it anyway",
                self.manifest.name,
            )
        self._network, self._inferer, self._preprocess = network, inferer, preprocess
        logger.info(
            "loaded MONAI bundle %s %s (%s, %s) on %s in %.2f s",
            self.manifest.name,
            self.manifest.version,
            type(network).__name__,
            type(inferer).__name__,
            self.device,
            time.perf_counter() - start,
        )

    # ------------------------------------------------------------------ inference

    def _prepare(self, volume: Volume) -> torch.Tensor:
        import torch

        x = volume_tensor(volume, self.device)
        for transform in self._preprocess:
            x = transform(x)
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if hasattr(x, "as_tensor"):  # MetaTensor -> plain tensor (TorchScript-friendly)
            x = x.as_tensor()
        return x[None]

    def predict(self, volume: Volume) -> Prediction:
        """Segment one volume; labels in the volume's (k, i, j) grid."""
        if self._network is None or self._inferer is None:
            raise RuntimeError("MonaiBundleRuntime.predict() called before load()")
        start = time.perf_counter()
        network, inferer = self._network, self._inferer
        arg, channels = run_network(
            self._prepare(volume),
            lambda x: execution.run_inferer(inferer, x, network),  # scheduler hooks
            self.device,
            self.manifest.mixed_precision,
        )
        if self._lut is None or len(self._lut) != channels:
            self._lut = channel_lookup(
                self.manifest, channels, str(self.model_dir), self._channel_names
            )
        return make_prediction(self._lut[arg], self.manifest, volume, self.device, start)
