"""Models loaded once and kept warm on their device."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class ModelPool:
    """Loads each model once, on first use or at start-up, and keeps it warm."""

    def __init__(self, models_dir: Path, device: str) -> None:
        self.models_dir = Path(models_dir)
        self.device = device
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                from dicomnode.inference.runtimes import load_model

                folder = self.models_dir / name
                if not (folder / "manifest.yaml").is_file():
                    raise FileNotFoundError(f"model {name!r}: no manifest at {folder}")
                model = load_model(folder, self.device)
                self._models[name] = model
            return model

    def loaded(self) -> dict[str, Any]:
        """The models loaded so far, by name."""
        with self._lock:
            return dict(self._models)
