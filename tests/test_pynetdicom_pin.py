"""The DIMSE door overrides pynetdicom internals (dicomnode/ingest/pynetdicom_ext.py).

This test pins every private name and signature those overrides rely on, so that a
pynetdicom upgrade that changes one fails here, naming it, instead of breaking the
receive path at run time."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import version

import pytest

from dicomnode.ingest.pynetdicom_ext import OVERRIDES, PYNETDICOM_VERSION


def test_pynetdicom_is_the_pinned_version() -> None:
    installed = version("pynetdicom")
    assert installed == PYNETDICOM_VERSION, (
        f"pynetdicom {installed} is installed but dicomnode/ingest/pynetdicom_ext.py was "
        f"written for {PYNETDICOM_VERSION}: check every entry of OVERRIDES against the new "
        "version's source, then update the pin in pyproject.toml and PYNETDICOM_VERSION")


@pytest.mark.parametrize(("module", "name", "signature"), OVERRIDES,
                         ids=[f"{m}.{n}" for m, n, _ in OVERRIDES])
def test_private_name_and_signature(module: str, name: str, signature: str | None) -> None:
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        assert hasattr(owner, part), f"pynetdicom changed: {module}.{'.'.join(path)} is gone"
        owner = getattr(owner, part)
    if hasattr(owner, attr):
        obj = getattr(owner, attr)
        if signature is not None:
            got = str(inspect.signature(obj))
            assert got == signature, (
                f"pynetdicom changed the signature of {module}.{name}:\n  expected {signature}"
                f"\n  found    {got}\nreview the override in dicomnode/ingest/pynetdicom_ext.py")
        return
    # an instance attribute: the class's own __init__ (or a base's) must still set it
    assert signature is None, f"pynetdicom changed: {module}.{name} is gone"
    assert inspect.isclass(owner), f"{module}.{'.'.join(path)} is not a class"
    sources = "".join(inspect.getsource(cls.__init__) for cls in owner.__mro__
                      if "__init__" in vars(cls) and cls.__module__.startswith("pynetdicom"))
    assert f"self.{attr} " in sources or f"self.{attr}:" in sources, (
        f"pynetdicom changed: {owner.__name__}.__init__ no longer sets self.{attr}, which "
        "dicomnode/ingest/pynetdicom_ext.py relies on")
