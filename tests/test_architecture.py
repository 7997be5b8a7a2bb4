"""The layers stay readable: no import circle, and config/ stays pure.

Every import counts, top-level or inside a function, so a lazy import
cannot hide a circle. A package's __init__.py imports nothing, so importing
`imagesmith.config.settings` never drags in the rest of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "imagesmith"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from imagesmith.cache import stages` imports the module cache.stages;
            # `from imagesmith.config.space import X` the module config.space.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "imagesmith":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(path, known) - {name} for name, path in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a list of modules, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_circles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_lazy_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from imagesmith.host import run\n")
    assert imports_of(source, set(modules())) == {"imagesmith.host.run"}


LOWER_LAYERS = {
    # layer: what it may import besides itself, errors and log
    "imagesmith.config": set(),
    "imagesmith.host": set(),
    "imagesmith.cache": {"imagesmith.config", "imagesmith.host"},
    "imagesmith.disk": {"imagesmith.config", "imagesmith.host"},
    "imagesmith.fai": {"imagesmith.config", "imagesmith.host"},
    "imagesmith.tree": {"imagesmith.config", "imagesmith.host", "imagesmith.cache"},
    "imagesmith.formats": {"imagesmith.config", "imagesmith.host"},
    "imagesmith.inspect": {
        "imagesmith.config",
        "imagesmith.host",
        "imagesmith.disk",
        "imagesmith.formats",
    },
    "imagesmith.stages": {
        "imagesmith.config",
        "imagesmith.host",
        "imagesmith.cache",
        "imagesmith.disk",
        "imagesmith.tree",
        "imagesmith.formats",
        "imagesmith.inspect",
        "imagesmith.context",
        "imagesmith",
    },
}
SHARED = {"imagesmith.errors", "imagesmith.log"}


def layer_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_layers_import_only_what_is_below_them() -> None:
    wrong = []
    for module, imported in import_graph().items():
        layer = layer_of(module)
        if layer not in LOWER_LAYERS:
            continue
        allowed = {layer, *LOWER_LAYERS[layer]}
        wrong += [
            f"{module} imports {name}"
            for name in sorted(imported)
            if name not in SHARED and layer_of(name) not in allowed
        ]
    assert not wrong, "\n".join(wrong)


def test_config_imports_nothing_from_host_or_stages() -> None:
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("imagesmith.config"):
            assert not {
                name
                for name in imported
                if name.startswith(("imagesmith.host", "imagesmith.stages"))
            }, module


def test_package_inits_import_nothing() -> None:
    for path in modules().values():
        if path.name == "__init__.py":
            assert not imports_of(path, set(modules())), f"{path} imports project modules"


def test_modules_and_functions_stay_short() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            long.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path}:{node.lineno}: {node.name}() is {length} lines")
    assert not long, "\n".join(long)
