"""The ``builtin`` runtime: a ModelRuntime subclass written in Python inside the
model folder, named by the manifest's ``entry_point`` (``file.py:ClassName``)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from dicomnode.core.manifest import Manifest
from dicomnode.errors import ConfigError
from dicomnode.inference.runtime import ModelRuntime


def builtin_class(manifest: Manifest, model_dir: Path) -> type[ModelRuntime]:
    where = str(Path(model_dir) / "manifest.yaml")
    if not manifest.entry_point or ":" not in manifest.entry_point:
        raise ConfigError(where, [("entry_point", "builtin models need 'file.py:ClassName'")])
    filename, _, class_name = manifest.entry_point.partition(":")
    source = (Path(model_dir) / filename).resolve()
    if Path(model_dir).resolve() not in source.parents or not source.is_file():
        raise ConfigError(where, [("entry_point", f"{filename} is not a file in the model folder")])
    # a unique module name per model folder, so two models may both have a model.py
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:10]
    module_name = f"dicomnode_models.{manifest.name.replace('-', '_').replace('.', '_')}_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, source)
        if spec is None or spec.loader is None:
            raise ConfigError(where, [("entry_point", f"cannot import {filename}")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, ModelRuntime):
        raise ConfigError(where, [("entry_point", f"{class_name} is not a ModelRuntime subclass")])
    return cls
