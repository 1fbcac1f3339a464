"""The package's import graph: no cycles, and the channel-linking core does not
import convert (its plain data lives next to ChannelGroup).

Read from the source, not from sys.modules: importing any submodule runs its
parent packages' __init__ first, which re-export everything, so at run time
everything imports everything. The graph here has one edge per explicit import
statement (at module level or inside a function: a lazy import is still a
dependency)."""
import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import dce_kernels

ROOT = Path(dce_kernels.__file__).parent


def _modules() -> dict[str, Path]:
    """Module name -> source file (the compiled extensions too: they import nothing)."""
    found = {}
    for path in ROOT.rglob("*"):
        stem = next((path.name[:-len(s)] for s in EXTENSION_SUFFIXES + [".py"]
                     if path.name.endswith(s)), None)
        if stem is None:
            continue
        parts = path.parent.relative_to(ROOT.parent).parts + (stem,)
        found[".".join(parts[:-1] if stem == "__init__" else parts)] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        if path.suffix != ".py":
            graph[name] = set()
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base not in modules:
                    continue
                for a in node.names:  # `from pkg import sub` imports the submodule
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        edges.discard(name)
        graph[name] = edges
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "dce_kernels.channels.group" in graph and graph["dce_kernels.channels.plan"]
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_only_the_users_of_convert_import_it():
    graph = _import_graph()
    conversion = "dce_kernels.channels.conversion"
    for core in ("group", "plan", "sequential", "optable", "spaces", "trace"):
        assert conversion not in _reachable(graph, f"dce_kernels.channels.{core}"), core
    assert conversion not in _reachable(graph, "dce_kernels.compact")
