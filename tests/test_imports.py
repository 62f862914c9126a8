"""The package's floors: a module imports only from floors below its own (or from its own
package), and the import graph has no cycle. Imports are read with ``ast`` (module level and
inside functions alike), so a cycle hidden by a function-level import is found too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "contrastseg"

# Bottom to top. A module's floor is that of its first name under contrastseg.
FLOORS: list[set[str]] = [
    {
        "errors",
        "files",
        "safe_load",
        "digest",
        "checks",
        "randomness",
        "precision",
        "distributed",
        "datasets_table",
        "model_table",
        "yaml_io",
        "config_checks",
    },
    {"config"},
    {"data", "models", "losses", "contrast", "prototype"},
    {"engine", "rundir"},
    {"viz", "report", "export", "hub", "onnx_predict", "convert", "benchmarks", "workflow"},
    {"cli", "__main__"},
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}
# Packages of one floor may use each other's public API (the package itself), never a module
# inside another package of their floor.
PACKAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every contrastseg module ``path`` imports, resolved (relative imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            # ``from contrastseg.x import y`` may import the module contrastseg.x.y
            found |= {f"{base}.{a.name}" for a in node.names}
    modules = all_modules()
    return {m for m in found if m in modules and m != name}


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__ imports lazily
        return len(FLOORS)
    return FLOOR_OF[parts[1]]


def test_every_module_has_a_floor():
    unknown = sorted({m.split(".")[1] for m in all_modules() if "." in m} - set(FLOOR_OF))
    assert not unknown, f"modules without a floor in tests/test_imports.py: {unknown}"


def test_no_module_imports_from_a_floor_above_or_another_packages_internals():
    bad = []
    for name, path in all_modules().items():
        if name == "contrastseg":
            continue
        top = name.split(".")[1]
        for imported in imports_of(path):
            other = imported.split(".")
            if len(other) == 1 or other[1] == top:
                continue
            if floor(imported) > floor(name):
                bad.append(f"{name} imports {imported} (floor {floor(imported)} > {floor(name)})")
            elif floor(imported) == floor(name) and other[1] in PACKAGES and len(other) > 2:
                bad.append(f"{name} imports {imported}, inside another package of its floor")
    assert not bad, "\n".join(sorted(bad))


def test_the_import_graph_has_no_cycle():
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        own = name.split(".")
        ancestors = {".".join(own[:i]) for i in range(1, len(own))}  # already being imported
        edges = set()
        for imported in imports_of(path):
            # importing a.b.c runs a.b's __init__ first
            parts = imported.split(".")
            edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[name] = {e for e in edges - ancestors if e in modules and e != name}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
