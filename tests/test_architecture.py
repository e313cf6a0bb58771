"""The package arrows of docs/architecture (rust_ext ◀─ actors ◀─ rllib_policies ◀─ serve_apps) and no
import circles, read from the source with ``ast`` (static: every import, wherever it sits in a module)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "rllib_policies", "serve_apps", "rust_ext")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """First-party modules ``path`` imports (``from pkg import name`` counts ``pkg.name`` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else {base, *submodules}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_import_circles():
    graph = _graph()
    circles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("actors", ("rllib_policies", "serve_apps")),
        ("rllib_policies", ("serve_apps",)),
        ("rust_ext", ("actors", "rllib_policies", "serve_apps")),
        ("serve_apps", ("rllib_policies.envs",)),  # serving loads trained modules, never training envs
    ],
)
def test_arrows(package, forbidden):
    graph = _graph()
    bad = {
        m: sorted(d for d in _reachable(graph, m) if d.startswith(forbidden))
        for m in graph
        if m == package or m.startswith(package + ".")
    }
    bad = {m: ds for m, ds in bad.items() if ds}
    assert not bad, f"{package} reaches {forbidden}: {bad}"
