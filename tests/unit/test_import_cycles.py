"""No import circle among app/ modules: no module imports one that imports it back, directly or
through others. Imports are read with `ast`, so imports inside functions (the usual way a circle
is hidden) and under `if TYPE_CHECKING:` count too."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The app modules `module` imports anywhere in its body (a `from pkg import name` counts as
    importing `pkg.name` when that is a module, else `pkg`)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name in known and name != module}


def import_graph(root: Path = APP) -> dict[str, set[str]]:
    paths = {_module_name(root, path): path for path in root.rglob("*.py")}
    known = set(paths)
    return {
        module: _imported(
            ast.parse(path.read_text(), filename=str(path)),
            module,
            path.name == "__init__.py",
            known,
        )
        for module, path in paths.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path `[a, b, ..., a]`, or None (depth-first search)."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> list[str] | None:
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_stack:
                return [*stack[stack.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        stack.pop()
        on_stack.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    package = tmp_path / "app"
    (package / "tools").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tools" / "__init__.py").write_text("")
    (package / "tools" / "registry.py").write_text(
        "def default():\n    from app.tools.builtin import register\n"
    )
    (package / "tools" / "builtin.py").write_text("from .registry import Tool\n")
    graph = import_graph(package)
    assert graph["app.tools.registry"] == {"app.tools.builtin"}
    assert graph["app.tools.builtin"] == {"app.tools.registry"}
    assert find_cycle(graph) == ["app.tools.builtin", "app.tools.registry", "app.tools.builtin"]


def test_app_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "app.tools.registry" in graph
    assert find_cycle(graph) is None
