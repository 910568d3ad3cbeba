"""What of a MONAI bundle's ``inference.json`` dicomnode runs, and what it refuses.

:func:`plan_bundle` reads a parsed bundle config (``monai.bundle.ConfigParser``) and
returns a :class:`BundlePlan`: the ``preprocessing`` transforms to run (every one
but the loading transforms, as instances), how the volume must be handed over (the
options of the bundle's ``LoadImage(d)``), and the ``postprocessing`` transforms
(saving transforms dropped). It raises :class:`BundleRefused` with the config part
and the reason when the bundle needs something the node cannot give it.

Per transform (names with or without the dictionary ``d``):

* ``LoadImage(d)`` (one, for one image key): not run; the node hands over the
  volume as it would return it. Honoured options: ``ensure_channel_first``,
  ``affine_lps_to_ras`` (default True, as MONAI's DICOM readers), ``image_only``
  (False: the meta dict is also put under ``<key>_meta_dict``). Refused: a loader
  for a second key (a second image or a label the node does not have), readers
  that cannot read DICOM series (``NumpyReader``, ``PILReader``).
* ``EnsureChannelFirst(d)``: run as configured on the channel-less volume, exactly
  as after ``LoadImage``.
* ``SaveImage(d)`` and other writers, in pre- or postprocessing: dropped.
* any other ``Load*`` transform: refused (it reads files).
* every other transform: run; a dictionary transform that needs a key the node
  does not provide (``label``, a second modality, ...) and does not allow missing
  keys is refused. The node provides the image key in preprocessing and the image
  key plus ``pred`` in postprocessing, plus keys earlier transforms copy into.
* ``Invertd`` in postprocessing: run against the transforms the node applied.

Also refused: networks that are not 3-D, more than one input, outputs that are not
images (detection boxes: see the runtime's docstring). Input channels are checked by
the runtime's dry run: the preprocessing must make from the one series as many
channels as the network takes (``AddCoordinateChannelsd`` may add some).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Readers of ``LoadImage`` that read DICOM series (or files with an affine).
SERIES_READERS = frozenset(
    {"", "itkreader", "pydicomreader", "nibabelreader", "nrrdreader", "nvimgcodecpydicomreader"}
)
#: The key the engine names the network output with (``monai.utils.CommonKeys.PRED``).
PRED_KEY = "pred"
_COMPOSE_OPTIONS = ("map_items", "unpack_items", "log_stats", "lazy", "overrides")
#: Attributes of dictionary transforms that name a further key they read.
_KEY_ATTRIBUTES = ("source_key", "label_key", "orig_keys", "image_key")


class BundleRefused(Exception):
    """The bundle needs something the node cannot provide: ``(where, reason)``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class BundlePlan:
    """The transforms dicomnode runs and how it hands the volume over."""

    image_key: str | None  # None: array (not dictionary) transforms
    preprocess: list[Any]
    postprocess: list[Any]
    compose_options: dict[str, Any] = field(default_factory=dict)
    lps_to_ras: bool = True
    channel_first: bool = False
    meta_dict: bool = False
    has_invert: bool = False
    dropped: list[str] = field(default_factory=list)


def base_name(target: object) -> str:
    """``'monai.transforms.Spacingd'`` -> ``'Spacingd'``."""
    return str(target).rsplit(".", 1)[-1]


def _stem(name: str) -> str:
    """``'LoadImaged'`` -> ``'LoadImage'`` (the dictionary form's array name)."""
    return name[:-1] if name.endswith("d") else name


def _items(parser: Any, part: str) -> tuple[list[Any], str, dict[str, Any]]:
    """(raw transform items, their config id prefix, raw Compose options) of a part."""
    raw = parser.get(part)
    if raw is None:
        return [], part, {}
    if isinstance(raw, dict) and isinstance(raw.get("transforms"), list):
        options = {k: raw[k] for k in _COMPOSE_OPTIONS if k in raw}
        return raw["transforms"], f"{part}#transforms", options
    if isinstance(raw, list):
        return raw, part, {}
    raise BundleRefused(part, "is neither a Compose with a transforms list nor a list")


def _parsed(parser: Any, config_id: str) -> Any:
    try:
        return parser.get_parsed_content(config_id)
    except Exception as exc:  # MONAI raises many kinds; the boundary names the part
        raise BundleRefused(config_id, f"cannot instantiate: {exc}") from None


def _disabled(parser: Any, raw: dict[str, Any], config_id: str) -> bool:
    flag = raw.get("_disabled_", False)
    if isinstance(flag, str) and flag[:1] in "@$":
        flag = _parsed(parser, f"{config_id}#_disabled_")
    if isinstance(flag, str):
        return flag.strip().lower() == "true"
    return bool(flag)


def _option(parser: Any, raw: dict[str, Any], config_id: str, name: str, default: Any) -> Any:
    if name not in raw:
        return default
    value = raw[name]
    if isinstance(value, str) and value[:1] in "@$":
        return _parsed(parser, f"{config_id}#{name}")
    return value


def _as_keys(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _check_keys(transform: Any, available: set[str], where: str) -> None:
    """Refuse a dictionary transform that reads a key the node does not provide."""
    from monai.transforms import MapTransform

    if not isinstance(transform, MapTransform) or transform.allow_missing_keys:
        return
    wanted = set(_as_keys(transform.keys))
    for attribute in _KEY_ATTRIBUTES:
        wanted |= set(_as_keys(getattr(transform, attribute, None)))
    missing = sorted(wanted - available)
    if missing:
        raise BundleRefused(
            where,
            f"{type(transform).__name__} needs key(s) {missing}; the node provides "
            f"{sorted(available)} (one image series per job)",
        )


def _produced(transform: Any) -> set[str]:
    """Keys a transform adds to the data dictionary (CopyItemsd, ConcatItemsd...)."""
    out: set[str] = set()
    for attribute in ("names", "name"):
        out |= set(_as_keys(getattr(transform, attribute, None)))
    return out


def _is_writer(name: str) -> bool:
    return _stem(name) in ("SaveImage", "SaveDicom", "WriteFileMapping") or name.startswith("Save")


def _loader(
    parser: Any, raw: dict[str, Any], config_id: str, plan: BundlePlan, seen: bool
) -> None:
    keys = _as_keys(_option(parser, raw, config_id, "keys", None))
    name = base_name(raw["_target_"])
    if seen or len(keys) > 1:
        what = ", ".join(keys) or name
        raise BundleRefused(
            config_id,
            f"loads a second image ({what}); the node provides one image series per job",
        )
    if name.endswith("d"):
        if not keys:
            raise BundleRefused(config_id, f"{name} without keys")
        plan.image_key = keys[0]
    reader = _option(parser, raw, config_id, "reader", None)
    reader_name = "" if reader is None else (
        reader if isinstance(reader, str) else type(reader).__name__
    )
    if reader_name.lower() not in SERIES_READERS:
        raise BundleRefused(
            config_id,
            f"reader {reader_name!r} does not read DICOM series; the node hands over a "
            f"volume with its patient geometry",
        )
    plan.lps_to_ras = bool(_option(parser, raw, config_id, "affine_lps_to_ras", True))
    if reader_name.lower() == "nibabelreader":
        plan.lps_to_ras = True  # NIfTI affines are RAS
    plan.channel_first = bool(_option(parser, raw, config_id, "ensure_channel_first", False))
    plan.meta_dict = not bool(_option(parser, raw, config_id, "image_only", True))


def _instances(parser: Any, items: list[Any], prefix: str, plan: BundlePlan,
               loaders: bool) -> list[tuple[str, Any]]:
    """Instantiate the transforms of one part that dicomnode runs, in order."""
    out: list[tuple[str, Any]] = []
    seen_loader = False
    for index, raw in enumerate(items):
        cid = f"{prefix}#{index}"
        if not isinstance(raw, dict) or "_target_" not in raw:
            raise BundleRefused(cid, "is not a transform (no _target_)")
        if _disabled(parser, raw, cid):
            continue
        name = base_name(raw["_target_"])
        if loaders and _stem(name) == "LoadImage":
            _loader(parser, raw, cid, plan, seen=seen_loader)
            seen_loader = True
            continue
        if _is_writer(name):
            plan.dropped.append(name)
            continue
        if name.startswith("Load"):
            raise BundleRefused(cid, f"{name} reads files; the node provides one image in memory")
        if name == "Invertd" and "transform" in raw:
            # the runtime points it at the transforms it applied, per call; instantiating
            # the config's own (with its LoadImaged) is not needed
            parser[f"{cid}#transform"] = "$monai.transforms.Compose([])"
        out.append((cid, _parsed(parser, cid)))
    if loaders and not seen_loader and not any(
        _stem(type(t).__name__) == "EnsureChannelFirst" for _, t in out
    ):
        plan.channel_first = True  # nothing adds a channel: hand the volume over with one
    return out


def plan_bundle(parser: Any, default_key: str = "image") -> BundlePlan:
    """The plan for a parsed bundle config, or :class:`BundleRefused`."""
    from monai.transforms import Invertd, MapTransform

    plan = BundlePlan(image_key=None, preprocess=[], postprocess=[])
    items, prefix, options = _items(parser, "preprocessing")
    plan.compose_options = {
        k: _option(parser, options, "preprocessing", k, v) for k, v in options.items()
    }
    pre = _instances(parser, items, prefix, plan, loaders=True)
    post_items, post_prefix, _ = _items(parser, "postprocessing")
    post = _instances(parser, post_items, post_prefix, plan, loaders=False)

    mapped = [isinstance(t, MapTransform) for _, t in pre + post]
    if plan.image_key is None and any(mapped):
        first = next(t for _, t in pre + post if isinstance(t, MapTransform))
        keys = _as_keys(first.keys) if pre and isinstance(pre[0][1], MapTransform) else ()
        plan.image_key = keys[0] if keys else default_key
    if plan.image_key is not None and not all(isinstance(t, MapTransform) for _, t in pre):
        raise BundleRefused("preprocessing", "mixes dictionary and array transforms")

    available = {plan.image_key} if plan.image_key else set()
    for cid, transform in pre:
        _check_keys(transform, available, cid)
        available |= _produced(transform)
        plan.preprocess.append(transform)
    available.add(PRED_KEY)
    for cid, transform in post:
        _check_keys(transform, available, cid)
        available |= _produced(transform)
        plan.has_invert = plan.has_invert or isinstance(transform, Invertd)
        plan.postprocess.append(transform)
    if plan.dropped:
        logger.info("bundle transforms not run (they write files): %s", ", ".join(plan.dropped))
    return plan


def refuse_unsupported(parser: Any) -> None:
    """Refuse bundles whose inputs/outputs the node cannot serve (before instantiating)."""
    outputs = parser.get("_meta_#network_data_format#outputs") or {}
    if isinstance(outputs, dict):
        for name, spec in outputs.items():
            kind = spec.get("type", "image") if isinstance(spec, dict) else "image"
            if kind != "image":
                fmt = spec.get("format", "?") if isinstance(spec, dict) else "?"
                raise BundleRefused(
                    f"metadata.json: network_data_format.outputs.{name}",
                    f"output of type {kind!r} (format {fmt!r}), e.g. detection boxes, not a "
                    f"label map; dicomnode returns label maps (SEG) only",
                )
    inputs = parser.get("_meta_#network_data_format#inputs") or {}
    if isinstance(inputs, dict):
        if len(inputs) > 1:
            raise BundleRefused(
                "metadata.json: network_data_format.inputs",
                f"needs {len(inputs)} inputs ({', '.join(map(str, inputs))}); the node "
                f"provides one image series per job",
            )
    inferer = parser.get("inferer")
    target = inferer.get("_target_", "") if isinstance(inferer, dict) else ""
    if isinstance(target, str) and target.startswith("scripts."):
        raise BundleRefused(
            "inference.json: inferer",
            f"{target} is the bundle's own code (scripts/), which dicomnode does not run",
        )
    dims = parser.get("network_def#spatial_dims")
    if isinstance(dims, str) and dims[:1] in "@$":
        dims = _parsed(parser, "network_def#spatial_dims")
    if dims is not None and dims != 3:
        raise BundleRefused(
            "inference.json: network_def#spatial_dims",
            f"a {dims}-D network; the node hands over 3-D volumes",
        )
