"""The package's shape (ARCHITECTURE.md): small modules, dependencies pointing one way,
no import circle. A change that breaks one of these fails here, naming the culprit."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dicomnode"
MAX_LINES = 620  # "about 600": a module is read in one sitting
STAGES = ("ingest", "routing", "inference", "encode", "export")
#: what sits below the stages and may be imported by any of them
BELOW = ("core", "config", "errors", "audit", "queue", "synthetic", "decoders")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, *, module_level: bool) -> set[str]:
    """dicomnode modules imported by ``path`` (only at module level, outside
    ``if TYPE_CHECKING``, when ``module_level``)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if module_level:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.extend(ast.walk(node) if isinstance(node, ast.Try | ast.If) else [node])
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("dicomnode"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dicomnode"))
    return found


def test_no_module_is_over_about_600_lines() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_no_stage_imports_another_stage() -> None:
    bad = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in STAGES:
            continue
        for imported in _imports(path, module_level=False):
            other = imported.split(".")
            if len(other) > 1 and other[1] in STAGES and other[1] != parts[1]:
                bad.append(f"{name} imports {imported}")
    assert not bad, "stages must not import each other:\n" + "\n".join(sorted(set(bad)))


def test_core_imports_nothing_above_it() -> None:
    bad = []
    for name, path in _modules().items():
        if not name.startswith("dicomnode.core"):
            continue
        for imported in _imports(path, module_level=True):
            top = imported.split(".")[1] if "." in imported else ""
            if top not in ("core", "errors"):
                bad.append(f"{name} imports {imported}")
    assert not bad, "core/ sits below everything:\n" + "\n".join(sorted(set(bad)))


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(path, module_level=True) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ importing its own submodules is not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
