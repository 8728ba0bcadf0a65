"""Dependencies point one way: every import between the package's modules (top-level and inside
functions, relative ones resolved) read with ``ast``, checked for cycles and against the layer order

    records <- graph <- targets <- profilers <- lut <- search <- api/cli

(a module never imports one of a higher layer). Package ``__init__`` modules count as modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it is installed as (pyproject.toml [tool.setuptools.package-dir])
SOURCES = {"hwmpq": "hwmpq", "targets": "hwmpq.targets", "profilers": "hwmpq.profilers", "lut": "hwmpq.lut"}

LAYERS = ("records", "graph", "targets", "profilers", "lut", "search", "api/cli")
# modules whose own layer differs from their package's
EXACT_LAYER = {
    "hwmpq": "records",  # the root package: its version and a table of names resolved on first use
    "hwmpq.search": "api/cli",  # the search package is also the verb hwmpq.search(...) (hwmpq/search/__init__.py)
}
# module or package prefix -> layer; the longest matching prefix wins; command-line modules (``cli``,
# ``*_cli``) are api/cli wherever they live
LAYER_OF = {
    "hwmpq.records": "records", "hwmpq.device": "records", "hwmpq.atomic": "records",
    "hwmpq.latency_stats": "records",
    "hwmpq.graph": "graph", "hwmpq.quantizers": "graph", "hwmpq.qmodules": "graph", "hwmpq.placement": "graph",
    "hwmpq.zoo": "graph", "hwmpq.modelspec": "graph", "hwmpq.data": "graph",
    "hwmpq.targets": "targets",
    "hwmpq.profilers": "profilers",
    "hwmpq.lut": "lut",
    "hwmpq.search": "search", "hwmpq.train": "search", "hwmpq.sam": "search", "hwmpq.frost": "search",
    "hwmpq.qat_options": "search",
    "hwmpq.api": "api/cli", "hwmpq.cli": "api/cli", "hwmpq.cli_core": "api/cli", "hwmpq.__main__": "api/cli",
}

def package_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed packages."""
    out = {}
    for folder, package in SOURCES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


MODULES = package_modules()


def _root_names() -> dict[str, str]:
    """The root package's lazily resolved names (``from hwmpq import profile`` imports hwmpq.api)."""
    tree = ast.parse(MODULES["hwmpq"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_NAMES" for t in node.targets):
            return {k: f"hwmpq.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


ROOT_NAMES = _root_names()


def _owner(name: str) -> str | None:
    """The package module ``name`` is, or is inside of (``hwmpq.lut.store.LutStore`` -> hwmpq.lut.store)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, int]:
    """Package modules ``module`` imports anywhere in its file -> the first line that does."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        if name and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hwmpq":
                    add(_owner(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "hwmpq":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES:  # ``from . import layers``: the submodule
                    add(full, node.lineno)
                elif source == "hwmpq" and alias.name in ROOT_NAMES:
                    add(_owner(ROOT_NAMES[alias.name]), node.lineno)
                else:
                    add(_owner(source), node.lineno)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> str:
    if module in EXACT_LAYER:
        return EXACT_LAYER[module]
    last = module.rpartition(".")[2]
    if last == "cli" or last.endswith("_cli"):
        return "api/cli"
    prefix = module
    while prefix:
        if prefix in LAYER_OF:
            return LAYER_OF[prefix]
        prefix = prefix.rpartition(".")[0]
    raise AssertionError(f"module {module} has no layer: add it to LAYER_OF in {__file__}")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges_without_known() -> dict[str, set[str]]:
    return {m: set(targets) for m, targets in GRAPH.items()}


def test_the_walk_sees_function_level_and_relative_imports():
    assert len(MODULES) > 50 and all(layer_of(m) in LAYERS for m in MODULES)
    assert "hwmpq.records" in GRAPH["hwmpq.targets.base"]  # top level, absolute
    assert "hwmpq.targets.base" in GRAPH["hwmpq.targets"]  # relative, from a package __init__
    assert "hwmpq.targets.ort.layers" in GRAPH["hwmpq.targets.ort.target"]  # ``from . import layers``
    assert "hwmpq.targets.energy" in GRAPH["hwmpq.targets.ort.target"]  # inside a method, two dots


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    cycles = _cycles(_edges_without_known())
    assert not cycles, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + "  (" + "; ".join(f"{a} -> {b}:{GRAPH[a][b]}" for a in c for b in c if b in GRAPH[a]) + ")"
        for c in cycles)


def test_no_module_imports_a_higher_layer():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)}) at line {line}"
           for m, targets in GRAPH.items() for t, line in sorted(targets.items())
           if rank[layer_of(t)] > rank[layer_of(m)]]
    assert not bad, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(bad)
