"""The arrows of docs/architecture.md hold: the rooms of app/ import each other only along the
arrows drawn there, every arrow drawn is used, and no import circle exists between modules.

A room is a package under app/ (`app/stream/`) or a top-level module (`app/cli.py`). The
foundation (config, errors, log, aio, text, instruments) may be imported by anyone and imports
nothing of chatd. Imports are read with `ast`, so imports inside functions (the usual way a
circle is hidden) and under `if TYPE_CHECKING:` count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
FOUNDATION = frozenset({"config", "errors", "log", "aio", "text", "instruments"})


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


def _room(module: str) -> str:
    """`app.stream.hub` -> `stream`; `app.cli` -> `cli`; `app` -> `app`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def room_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports between rooms, without those of the foundation."""
    return {
        (_room(module), _room(target))
        for module, targets in graph.items()
        for target in targets
        if _room(module) != _room(target) and _room(target) not in FOUNDATION
    }


_ARROW_LINE = re.compile(r"^(?P<room>[a-z_]+)\s+->\s+(?P<targets>.*)$")


def drawn_arrows(markdown: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The rooms and arrows of the block after the `<!-- arrows -->` marker: lines
    `room -> a, b`; a parenthesis after the arrow means "no room"."""
    block = markdown.split("<!-- arrows", 1)[1].split("```", 2)[1]
    rooms: set[str] = set()
    arrows: set[tuple[str, str]] = set()
    for line in block.strip().splitlines():
        match = _ARROW_LINE.match(line.strip())
        assert match, f"not an arrow line: {line!r}"
        rooms.add(match["room"])
        targets = match["targets"]
        if not targets.startswith("("):
            arrows.update((match["room"], target.strip()) for target in targets.split(","))
    return rooms, arrows


def test_the_rooms_import_each_other_only_along_the_drawn_arrows() -> None:
    graph = import_graph()
    rooms, drawn = drawn_arrows(ARCHITECTURE.read_text())
    actual = room_arrows(graph)
    present = {_room(module) for module in graph} - FOUNDATION - {"app"}
    assert present == rooms, "every room of app/ is drawn, and only those"
    assert sorted(actual - drawn) == [], "imports that no arrow allows"
    assert sorted(drawn - actual) == [], "arrows drawn that the code no longer uses"


def test_the_foundation_imports_nothing_of_chatd() -> None:
    graph = import_graph()
    offenders = {
        module: targets
        for module, targets in graph.items()
        if _room(module) in FOUNDATION and any(_room(target) != _room(module) for target in targets)
    }
    assert offenders == {}


def test_app_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "app.tools.registry" in graph
    assert find_cycle(graph) is None


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """A planted import inside a function is seen, a circle is found, an undrawn arrow shows."""
    package = tmp_path / "app"
    (package / "tools").mkdir(parents=True)
    (package / "state").mkdir()
    for init in (package, package / "tools", package / "state"):
        (init / "__init__.py").write_text("")
    (package / "tools" / "registry.py").write_text(
        "def default():\n    from app.tools.builtin import register\n"
    )
    (package / "tools" / "builtin.py").write_text("from .registry import Tool\n")
    (package / "state" / "chats.py").write_text("from app.tools import registry\n")
    graph = import_graph(package)
    assert graph["app.tools.registry"] == {"app.tools.builtin"}
    assert graph["app.tools.builtin"] == {"app.tools.registry"}
    cycle = find_cycle(graph)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"app.tools.builtin", "app.tools.registry"}
    assert room_arrows(graph) == {("state", "tools")}
    rooms, arrows = drawn_arrows("<!-- arrows -->\n```\ntools -> state\nstate -> (none)\n```\n")
    assert rooms == {"tools", "state"}
    assert room_arrows(graph) - arrows == {("state", "tools")}


def shared_file_names(root: Path = APP) -> dict[str, list[str]]:
    """File names used by more than one module under `root` (`__init__.py` aside)."""
    by_name: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name != "__init__.py":
            by_name.setdefault(path.name, []).append(str(path.relative_to(root.parent)))
    return {name: paths for name, paths in by_name.items() if len(paths) > 1}


def test_no_two_modules_share_a_file_name(tmp_path: Path) -> None:
    """A file name alone says where a thing is: `streams.py` is never two rooms."""
    assert shared_file_names() == {}
    (tmp_path / "app" / "http").mkdir(parents=True)
    (tmp_path / "app" / "errors.py").write_text("")
    (tmp_path / "app" / "http" / "errors.py").write_text("")
    assert shared_file_names(tmp_path / "app") == {
        "errors.py": ["app/errors.py", "app/http/errors.py"]
    }
