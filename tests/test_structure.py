"""The shape of the code base, checked over the AST of every module in streamapp/: imports form no
cycle (module-level, TYPE_CHECKING and function-local imports alike), the packages depend one way
along an event's path, and a function-local import says why it is one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streamapp"

# What each package may not import: the lake never reaches back into the engine or the web, the
# engine never into the web, and the web process never loads the lake (pyiceberg, pyarrow). The
# dashboard reads the engine's and the lake's figures; nothing depends on it.
FORBIDDEN = {
    "streamapp.lake": ("streamapp.engine", "streamapp.web", "streamapp.dashboard"),
    "streamapp.engine": ("streamapp.web", "streamapp.dashboard"),
    "streamapp.web": ("streamapp.lake", "streamapp.dashboard"),
    "streamapp.dashboard": ("streamapp.web",),
}
# Words one of which the comment of a function-local import must hold: what the import saves.
REASONS = ("RSS", "start-up", "startup", "memory")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The streamapp modules an import statement loads (a package's __init__ included)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
    for name in candidates:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            prefix = ".".join(parts[:i])
            if prefix in known:
                names.add(prefix)
    return names


def import_nodes(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        deps: set[str] = set()
        for node in import_nodes(ast.parse(path.read_text())):
            deps |= imported(node, known)
        # A package's __init__ runs before its modules; a module importing its own package's
        # __init__ is not a cycle through code.
        edges[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_form_no_cycle():
    edges = graph()
    assert len(edges) > 20  # the walk found the package
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_packages_depend_one_way():
    wrong = [
        (module, dep)
        for module, deps in graph().items()
        for dep in deps
        for package, forbidden in FORBIDDEN.items()
        if (module == package or module.startswith(package + "."))
        and any(dep == f or dep.startswith(f + ".") for f in forbidden)
    ]
    assert wrong == []


def function_local_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside a function body, except optional ones under `try: ... except ImportError`
    (or a broader handler), which are there for a platform, not for memory."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and node.handlers:
            for sub in node.body:
                guarded |= {id(n) for n in ast.walk(sub) if isinstance(n, (ast.Import, ast.ImportFrom))}
    local = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local += [n for n in import_nodes(node) if id(n) not in guarded]  # type: ignore[arg-type]
    return local


def test_every_function_local_import_says_what_it_saves():
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in function_local_imports(ast.parse(path.read_text())):
            # The comment is on the import's line, the line above, or above the imports it opens.
            context = lines[max(0, node.lineno - 4) : node.lineno]
            if not any("#" in line and any(r in line for r in REASONS) for line in context):
                unexplained.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert unexplained == []


@pytest.mark.parametrize(
    ("code", "absent"),
    [
        # the web process: its routes and the models it validates against
        (
            "import streamapp.web.server; from streamapp import app; app.discover_models()",
            ("pyiceberg", "pyarrow", "sqlalchemy"),
        ),
        # the supervisor of several web processes (`python -m streamapp web`)
        ("import streamapp.cli, streamapp.web.processes", ("aiohttp", "pyiceberg", "pyarrow", "sqlalchemy")),
    ],
)
def test_the_web_processes_stay_light(code, absent):
    """What the function-local imports are for: the web processes load no more than they use."""
    check = f"import sys; {code}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
