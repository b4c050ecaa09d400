"""The package's import graph, read statically from the source: no module of fastpo
imports, directly or through others, a module that imports it back (function-level
imports included, which is where such cycles hide)."""

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Every module of the installed packages (pyproject's package-dir), by dotted name."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in setuptools["package-dir"].items():
        for path in sorted((REPO / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _defined(path: Path) -> set[str]:
    """The names a module's top level binds (definitions, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastpo modules that module ``name`` imports anywhere in its source. ``from
    package import x`` is an import of the module ``package.x`` when there is one, of
    ``package`` when its ``__init__`` defines ``x``, and of neither otherwise (a compiled
    extension, such as the native kernels' ``_C``)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.append(f"{base}.{alias.name}")
                elif base in modules and (modules[base].stem != "__init__" or alias.name in _defined(modules[base])):
                    targets.append(base)
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (first repeated last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_reader_sees_function_level_imports_and_cycles():
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert "fastpo.engine.algorithms.sft" in graph["fastpo.engine.warm_start"]  # a top-level relative import
    assert "fastpo.kernels" in graph["fastpo.engine.forward"]  # an absolute one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package():
    modules = _modules()
    assert {"fastpo.kernels", "fastpo.engine", "fastpo.engine.algorithms"} <= modules.keys()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)
