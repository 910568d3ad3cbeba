"""MONAI bundle runtime: a model folder laid out as the MONAI model zoo ships a bundle.

The model folder is the bundle root, with dicomnode's ``manifest.yaml`` beside it::

    models/<name>/
      manifest.yaml            runtime: monai_bundle (name, version, labels with codes)
      configs/inference.json   (or inference.yaml) network_def, inferer, pre/postprocessing
      configs/metadata.json    optional: version, network_data_format (output channels)
      models/model.pt          state dict for network_def ... or
      models/model.ts          TorchScript (network_def then not needed)

``manifest.weights``, when set, names the weights file inside the folder instead
(a ``.ts`` suffix means TorchScript, anything else a state dict).

What runs, as MONAI's ``SupervisedEvaluator`` would run the bundle's ``inference.json``
(parsed with ``monai.bundle.ConfigParser``; ``bundle_root`` and ``device`` are
overridden with the model folder and ``self.device``):

* ``network_def``: instantiated, weights loaded strictly, moved to the device once
  and kept there in eval mode (warm);
* ``preprocessing``: every transform except the loading ones
  (:mod:`dicomnode.inference.bundle_plan` says per transform what is run, dropped or
  refused). Instead of ``LoadImage(d)`` the node hands the series over as MONAI's own
  DICOM readers would return it (:mod:`dicomnode.inference.bundle_geometry`): a
  ``MetaTensor`` indexed ``(x, y, z)`` = (column, row, slice) with the RAS affine of
  the DICOM geometry, so ``Orientationd``, ``Spacingd``, crops and intensity
  transforms behave exactly as on a file the bundle was trained with;
* ``inferer`` (typically ``SlidingWindowInferer``; when absent, a sliding window over
  ``manifest.patch_size`` or the whole volume), under ``torch.inference_mode`` and,
  on CUDA when ``manifest.mixed_precision`` and the bundle's ``amp`` allow, float16 autocast;
* ``postprocessing`` with the image and the prediction under ``pred``, as the
  engine hands them: activations, ``Invertd`` (which undoes the preprocessing the
  node applied, back to the handed-over grid), ``AsDiscreted`` ...; writers
  (``SaveImaged``) are dropped. A bundle without ``Invertd`` whose preprocessing
  changed the grid is inverted by the node (nearest neighbour) after its
  postprocessing.

The result, one channel of label values (else the argmax over channels), is taken
back to the volume's ``(k, i, j)`` grid and mapped to the manifest's labels: output
channel ``c`` maps to the manifest label whose name equals the channel's name in
``metadata.json`` (``network_data_format.outputs.*.channel_def``), else to the label
with value ``c``.

Refused at load, with the model's folder and the reason (the node keeps its other
models): configs that do not parse, weights that do not fit, a second image or label
key, file-reading transforms, 2-D networks, several inputs or input channels, the
bundle's own ``scripts/`` code as inferer, and outputs that are not images. The
last one covers detection bundles (``lung_nodule_ct_detection``: RetinaNet boxes in
world coordinates): the node returns label maps as DICOM-SEG, and does not turn
boxes into labels or measurements. Every accepted chain is also run once at load on
a small synthetic volume with stand-in network outputs, so that a transform that
cannot run on what the node hands over is refused at start-up, not at the first job.

Bundles are trusted code: ``$`` expressions in a config are evaluated by MONAI and
TorchScript files carry code. Only install bundles you would install as software.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.core.manifest import Manifest
from dicomnode.errors import ConfigError
from dicomnode.inference import execution
from dicomnode.inference.bundle_geometry import Handover, labels_to_volume, to_metatensor
from dicomnode.inference.bundle_plan import (
    PRED_KEY,
    BundlePlan,
    BundleRefused,
    plan_bundle,
    refuse_unsupported,
)
from dicomnode.inference.geometry import Volume
from dicomnode.inference.runtime import ModelRuntime, Prediction
from dicomnode.inference.runtimes.torchscript import (
    autocast,
    channel_lookup,
    check_device,
    file_in_model_dir,
    first_output,
    make_prediction,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS_NAMES = ("models/model.pt", "models/model.ts")
#: The synthetic volume every accepted chain is run on at load: (k, i, j), spacing mm.
DRY_RUN_SHAPE = (12, 24, 20)
DRY_RUN_SPACING = (4.0, 3.0, 3.0)


@dataclass
class _Prepared:
    """A volume after the bundle's preprocessing."""

    data: Any  # the data dictionary (or the image, for array transforms)
    image: Any  # the preprocessed image, a MetaTensor (C, ...)
    compose: Any  # the Compose that was applied (Invertd inverts this one)
    handover: Handover
    x: torch.Tensor  # network input (1, C, ...) on the device


class MonaiBundleRuntime(ModelRuntime):
    """Runs a MONAI bundle (``configs/inference.json`` + ``models/model.pt|ts``)."""

    def __init__(self, manifest: Manifest, model_dir: Path, device: str) -> None:
        super().__init__(manifest, model_dir, device)
        self._network: Any = None
        self._inferer: Callable[..., Any] | None = None
        self._plan: BundlePlan | None = None
        #: the preprocessing transforms run, in order (a list: tests may edit it)
        self._preprocess: list[Any] = []
        self._channel_names: dict[int, str] = {}
        self._channels: int | None = None
        self._lut: np.ndarray | None = None
        self._amp = manifest.mixed_precision
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
            self._inferer_device(inferer)
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


    def _inferer_device(self, inferer: Any) -> None:
        """A config's CUDA device for the inferer's output/windows becomes ours on a CPU
        node (a ``cpu`` output device is kept: it spares GPU memory on big volumes)."""
        import torch

        for attribute in ("device", "sw_device"):
            value = getattr(inferer, attribute, None)
            if value is None:
                continue
            if torch.device(value).type == "cuda":
                setattr(inferer, attribute, torch.device(self.device))

    def _read_amp(self, parser: Any) -> None:
        """Autocast when the manifest allows it and the bundle's ``amp`` does not forbid it."""
        raw = parser.get("amp", parser.get("evaluator#amp"))
        if isinstance(raw, str) and raw.startswith("@"):
            raw = parser.get(raw[1:])
        if raw is False and self.manifest.mixed_precision:
            logger.info("%s: the bundle sets amp false; no autocast", self.manifest.name)
        self._amp = self.manifest.mixed_precision and raw is not False

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
            self._channels = channels
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
        try:
            refuse_unsupported(parser)
        except BundleRefused as exc:
            raise self._error(exc.where, exc.reason) from None
        self._read_meta(parser)
        self._read_amp(parser)
        network = self._load_network(parser)
        network.eval()
        inferer = self._load_inferer(parser)
        try:
            plan = plan_bundle(parser)
        except BundleRefused as exc:
            raise self._error(f"inference.json: {exc.where}", exc.reason) from None
        self._plan, self._preprocess = plan, list(plan.preprocess)
        self._network, self._inferer = network, inferer
        self._dry_run(parser)
        logger.info(
            "loaded MONAI bundle %s %s (%s, %s; %d preprocessing, %d postprocessing "
            "transforms%s) on %s in %.2f s",
            self.manifest.name,
            self.manifest.version,
            type(network).__name__,
            type(inferer).__name__,
            len(plan.preprocess),
            len(plan.postprocess),
            f", dropped {', '.join(plan.dropped)}" if plan.dropped else "",
            self.device,
            time.perf_counter() - start,
        )

    def _dry_run(self, parser: Any) -> None:
        """Run the chain once on a small synthetic volume with stand-in network outputs."""
        import torch

        n = DRY_RUN_SHAPE[0]
        rng = np.random.default_rng(0)
        volume = Volume(
            array=rng.uniform(-1000.0, 1000.0, DRY_RUN_SHAPE).astype(np.float32),
            origin=np.array([-30.0, -36.0, 0.0]),
            row_direction=np.array([1.0, 0.0, 0.0]),
            col_direction=np.array([0.0, 1.0, 0.0]),
            slice_direction=np.array([0.0, 0.0, 1.0]),
            spacing=DRY_RUN_SPACING,
            slice_positions=np.arange(n) * DRY_RUN_SPACING[0],
            sop_instance_uids=tuple(f"2.25.{k + 1}" for k in range(n)),
            study_uid="2.25.1", series_uid="2.25.2", frame_of_reference_uid="2.25.3",
            modality="CT",
        )
        channels = self._channels or self._config_channels(parser) or 2
        try:
            prepared = self._run_preprocessing(volume, to_device=False)
            spatial = tuple(prepared.image.shape[1:])
            logits = torch.zeros((1, channels, *spatial))
            logits[:, 0] = 1.0
            labels = self._postprocess(prepared, logits)
        except Exception as exc:  # any transform failure: the chain cannot run here
            raise self._error(
                "inference.json: preprocessing/postprocessing",
                f"does not run on a volume the node hands over: {type(exc).__name__}: {exc}",
            ) from None
        if labels.shape != volume.shape:
            raise self._error(
                "inference.json: postprocessing",
                f"labels of shape {labels.shape} for a volume of {volume.shape}",
            )
        wanted = parser.get("network_def#in_channels")
        if isinstance(wanted, int) and wanted != prepared.image.shape[0]:
            raise self._error(
                "inference.json: network_def#in_channels",
                f"the network takes {wanted} input channels; the preprocessing makes "
                f"{prepared.image.shape[0]} from the one series the node provides",
            )

    @staticmethod
    def _config_channels(parser: Any) -> int | None:
        value = parser.get("network_def#out_channels")
        return value if isinstance(value, int) and value >= 1 else None

    # ------------------------------------------------------------------ inference

    def _run_preprocessing(self, volume: Volume, to_device: bool = True) -> _Prepared:
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Compose

        plan = self._plan
        if plan is None:
            raise RuntimeError("MonaiBundleRuntime.predict() called before load()")
        image, handover = to_metatensor(
            volume, lps_to_ras=plan.lps_to_ras, channel_first=plan.channel_first
        )
        compose = Compose(list(self._preprocess), **plan.compose_options)
        key = plan.image_key
        if key is None:
            data: Any = compose(image)
            out = data
        else:
            source: dict[str, Any] = {key: image}
            if plan.meta_dict:
                source[f"{key}_meta_dict"] = dict(image.meta)
            data = compose(source)
            out = data[key]
        if not isinstance(out, MetaTensor):
            raise ValueError(
                f"preprocessing returned a {type(out).__name__}, not a MONAI MetaTensor "
                f"(a transform dropped the image geometry)"
            )
        if out.ndim != 4:
            raise ValueError(
                f"preprocessing returned shape {tuple(out.shape)}, expected (channel, x, y, z)"
            )
        x = torch.as_tensor(out.as_tensor(), dtype=torch.float32)[None]
        if to_device:
            x = x.to(self.device)
        return _Prepared(data=data, image=out, compose=compose, handover=handover, x=x)

    def _prepare(self, volume: Volume) -> torch.Tensor:
        """The network input ``(1, C, ...)`` for a volume (after the preprocessing)."""
        return self._run_preprocessing(volume).x

    def _postprocess(self, prepared: _Prepared, logits: torch.Tensor) -> np.ndarray:
        """The bundle's postprocessing on the network output; labels ``(k, i, j)``."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Compose, Invertd
        from monai.transforms.utils import convert_applied_interp_mode

        plan = self._plan
        assert plan is not None
        image = prepared.image
        pred = MetaTensor(
            logits[0].float(),
            meta=copy.deepcopy(image.meta),
            applied_operations=copy.deepcopy(image.applied_operations),
        )
        steps = []
        for transform in plan.postprocess:
            if isinstance(transform, Invertd):
                transform = copy.copy(transform)  # inverts what *this* call applied
                transform.transform = prepared.compose
            steps.append(transform)
        key = plan.image_key
        if key is None:
            out = Compose(steps)(pred) if steps else pred
        else:
            data = Compose(steps)({**prepared.data, PRED_KEY: pred})
            out = data[PRED_KEY]
        if not plan.has_invert and image.applied_operations:
            # the bundle leaves the prediction on its own grid: take it back (nearest)
            ops = convert_applied_interp_mode(
                copy.deepcopy(image.applied_operations), mode="nearest", align_corners=None
            )
            out = MetaTensor(
                torch.as_tensor(out), meta=copy.deepcopy(image.meta), applied_operations=ops
            )
            if key is None:
                out = prepared.compose.inverse(out)
            else:
                out = prepared.compose.inverse({key: out})[key]
        labels = torch.as_tensor(out).detach()
        if labels.ndim == 4 and labels.shape[0] > 1:
            labels = torch.argmax(labels, dim=0)
        else:
            rounded = torch.round(labels.float())
            if not torch.allclose(rounded, labels.float(), atol=1e-3):
                raise ValueError(
                    "postprocessing leaves one channel of non-integer values; a bundle "
                    "must end with label values (e.g. AsDiscreted argmax) or class channels"
                )
            labels = rounded
        return labels_to_volume(labels.to(torch.int64), prepared.handover)

    def predict(self, volume: Volume) -> Prediction:
        """Segment one volume; labels in the volume's (k, i, j) grid."""
        import torch

        if self._network is None or self._inferer is None or self._plan is None:
            raise RuntimeError("MonaiBundleRuntime.predict() called before load()")
        start = time.perf_counter()
        network, inferer = self._network, self._inferer
        # no_grad, not inference_mode: the postprocessing may update tensors in place
        with torch.no_grad():
            prepared = self._run_preprocessing(volume)
            with autocast(self.device, self._amp):
                # the scheduler's hooks (STAT pre-emption, smaller window batches after OOM)
                logits = first_output(execution.run_inferer(inferer, prepared.x, network))
            logits = torch.as_tensor(logits)
            if logits.ndim != 5 or tuple(logits.shape[2:]) != tuple(prepared.x.shape[2:]):
                raise ValueError(
                    f"network output shape {tuple(logits.shape)} does not match its input "
                    f"{tuple(prepared.x.shape)}"
                )
            channels = max(int(logits.shape[1]), 2)
            arg = self._postprocess(prepared, logits)
        if self._lut is None or len(self._lut) != channels:
            self._lut = channel_lookup(
                self.manifest, channels, str(self.model_dir), self._channel_names
            )
        if int(arg.max(initial=0)) >= len(self._lut) or int(arg.min(initial=0)) < 0:
            raise ValueError(
                f"bundle labels range {int(arg.min())}..{int(arg.max())}, the network has "
                f"{channels} channels"
            )
        labels = self._lut[arg]
        return make_prediction(labels, self.manifest, volume, self.device, start)
