"""Every third-party package the code imports is declared in pyproject.toml.

Each module is parsed with ``ast`` (nothing is imported); every absolute ``import`` /
``from ... import`` names a top-level module, anywhere in the file (an import inside a
function is as much a dependency as one at the top). Standard-library modules and the
project's own are left out; the rest are mapped to the distributions that provide
them with ``importlib.metadata.packages_distributions()`` (``PIL`` -> Pillow, ``yaml``
-> PyYAML) and looked up in ``[project] dependencies`` (for tests/ also in the
``test`` extra).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Declared, never imported by name: pydicom finds and loads them as pixel decoder
# plugins (see dicomnode/decoders.py).
PLUGINS = {"python-gdcm", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
           # MONAI's Orientationd/Spacingd on a bundle's volume import nibabel themselves
           "nibabel"}


def _normalise(name: str) -> str:
    """PEP 503 name normalisation: 'PyYAML' -> 'pyyaml', 'python_gdcm' -> 'python-gdcm'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"pyproject.toml: cannot read the requirement {spec!r}"
    return _normalise(match.group(1))


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_requirement_name(s) for s in project["dependencies"]}
    if extra is not None:
        names |= {_requirement_name(s) for s in project["optional-dependencies"][extra]}
    return names


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in the Python file ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party(folder: Path) -> dict[str, set[str]]:
    """{top-level module: files importing it} for imports that are neither the standard
    library, nor dicomnode, nor a module or package of ``folder`` itself."""
    # modules a file of ``folder`` imports by their top-level name (tests/orthanc.py,
    # bench helpers); a nested module of the package (dicomnode/queue/celery.py) is never
    # imported by a bare name, so it must not hide the distribution of the same name
    local = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for name in imported_modules(path):
            if name in sys.stdlib_module_names or name in local or name in ("dicomnode", "__future__"):
                continue
            out.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return out


def undeclared(folder: Path, declared: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(third_party(folder).items()):
        dists = {_normalise(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files)[:3]) + (" ..." if len(files) > 3 else "")
        if not dists:
            problems.append(f"'{module}' (imported in {where}) is provided by no installed "
                            "distribution: install and declare it")
        elif not dists & declared:
            problems.append(f"'{module}' (imported in {where}) comes from {sorted(dists)}, "
                            "which pyproject.toml does not declare")
    return problems


def test_package_declares_every_import() -> None:
    problems = undeclared(ROOT / "dicomnode", _declared())
    assert not problems, "undeclared dependencies of the package:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", ["tests", "bench", "models"])
def test_tests_benchmarks_and_models_declare_every_import(folder: str) -> None:
    if not (ROOT / folder).is_dir():
        pytest.skip(f"{folder}/ is absent")
    problems = undeclared(ROOT / folder, _declared("test"))
    assert not problems, f"undeclared dependencies of {folder}/:\n" + "\n".join(problems)


def test_every_declared_dependency_is_used() -> None:
    """A dependency nobody imports is dead weight, unless pydicom loads it as a plugin."""
    providers = importlib.metadata.packages_distributions()
    used = set()
    for folder in ("dicomnode", "models"):
        for module in third_party(ROOT / folder):
            used |= {_normalise(d) for d in providers.get(module, [])}
    unused = _declared() - used - PLUGINS
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_plugins_are_declared() -> None:
    assert PLUGINS <= _declared(), f"not declared: {sorted(PLUGINS - _declared())}"


def test_no_gpl_dependency_declared() -> None:
    """The project is Apache-2.0: no declared runtime dependency may be GPL-licensed."""
    gpl = []
    for name in sorted(_declared()):
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here; test_package_declares_every_import covers use
        text = " ".join([*(meta.get_all("License-Expression") or []),
                         *(x[:200] for x in meta.get_all("License") or []),
                         *(meta.get_all("Classifier") or [])])
        if re.search(r"(?<!L)GPL|GNU General Public", text):
            gpl.append(f"{name}: {text[:120]}")
    assert not gpl, "GPL-licensed dependencies:\n" + "\n".join(gpl)
