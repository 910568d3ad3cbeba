"""Model runtimes, one file each: builtin (Python code in the model folder),
torchscript, monai_bundle. ``load_model`` reads a model folder's manifest and
returns its runtime, loaded and warm on its device."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicomnode.core.manifest import Manifest, load_manifest
from dicomnode.inference.runtime import ModelRuntime

LOG = logging.getLogger(__name__)


def runtime_class(manifest: Manifest, model_dir: Path) -> type[ModelRuntime]:
    if manifest.runtime == "builtin":
        from dicomnode.inference.runtimes.builtin import builtin_class

        return builtin_class(manifest, model_dir)
    if manifest.runtime == "torchscript":
        from dicomnode.inference.runtimes.torchscript import TorchScriptRuntime

        return TorchScriptRuntime
    if manifest.runtime == "monai_bundle":
        from dicomnode.inference.runtimes.monai_bundle import MonaiBundleRuntime

        return MonaiBundleRuntime
    raise ValueError(f"unknown runtime {manifest.runtime!r}")  # manifest validation prevents it


def load_model(model_dir: Path, device: str) -> ModelRuntime:
    """Read ``model_dir/manifest.yaml``, build its runtime on ``device`` and load it once."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    cls = runtime_class(manifest, model_dir)
    runtime = cls(manifest, model_dir, device)
    started = time.perf_counter()
    runtime.load()
    LOG.info("model %s %s loaded on %s in %.2f s (%s runtime)", manifest.name, manifest.version,
             device, time.perf_counter() - started, manifest.runtime)
    return runtime
