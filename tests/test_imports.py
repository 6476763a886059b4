"""The package's import structure: no circles, no imports hidden in functions, light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import natgrad

SRC = Path(natgrad.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _natgrad_targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The natgrad modules an import statement loads (``from natgrad import data`` loads natgrad.data)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n in MODULES]


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: top level and inside top-level try/if, not TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try) and not _type_checking_block(node):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {t for node in _module_level_imports(tree) for t in _natgrad_targets(node)} - {name}
    return graph


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if dep.startswith(module + "."):  # a package importing its own submodules
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_natgrad_import_inside_a_function():
    hidden = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [f"{name}.{node.name}" for inner in ast.walk(node)
                           if isinstance(inner, ast.Import | ast.ImportFrom) and _natgrad_targets(inner)]
    assert hidden == []


def test_analysis_does_not_depend_on_the_engine():
    graph = _graph()
    reached, todo = set(), [m for m in graph if m.startswith("natgrad.analysis")]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo.extend(graph[m])
    assert sorted(m for m in reached if m.startswith("natgrad.engine")) == []


def test_config_does_not_load_autoattack_or_the_engine():
    code = ("import sys, natgrad.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyautoattack' "
            "or m.startswith('natgrad.engine') or m.startswith('natgrad.objectives')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
