"""The layer check: every import in ``src/rematch`` points down the layers the README names.

Why a script and a test: the layering (``cli`` on top, the floor of ``config``, ``atomic``,
``distributed`` ... at the bottom) only stays true if something fails when it stops being
true. This reads the module import graph from the source (``ast``, so imports inside
functions count as much as those at the top) and compares it with the layer table in the
README's "Architecture" section, the one place the layers are written down. It reports

* an arrow up: a module importing from a higher layer;
* a cycle between modules (within a layer too), found on the whole graph;
* a module that no row of the table covers, and a table row that covers no module;

except for the arrows listed in the README's "Layer exceptions" table, each with its reason.

    python scripts/check_layers.py            # prints the problems, exit 1 if any
    python scripts/check_layers.py --graph    # also prints every internal import
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "rematch"
LAYERS_HEADING = "### Layers"
EXCEPTIONS_HEADING = "### Layer exceptions"


@dataclass(frozen=True)
class Import:
    """One internal import: ``source`` imports ``target`` at ``line`` (inside a function or not)."""

    source: str
    target: str
    line: int
    in_function: bool


def module_files(src: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``src/rematch`` (a package is its ``__init__``)."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, else its closest enclosing package or module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of ``module`` that lands inside the package (``from x import y`` names module ``x.y`` if it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_function = _function_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _nearest_module(name, modules)
                if target and target != module:
                    found.append(Import(module, target, node.lineno, id(node) in in_function))
    return found


def import_graph(src: Path) -> list[Import]:
    modules = module_files(src)
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]


def _section(readme: str, heading: str) -> list[str]:
    """The lines under ``heading`` up to the next heading of any level."""
    lines = readme.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        raise ValueError(f"README has no {heading!r} section") from None
    body = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        body.append(line)
    return body


def _table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines
            if line.strip().startswith("|")]
    return [row for row in rows[2:]]  # header and its rule


def _module_names(cell: str) -> list[str]:
    """``cli.py``, ``commands/`` and ``rematch/__init__.py`` in a cell -> dotted prefixes."""
    names = []
    for written in re.findall(r"`([^`]+)`", cell):
        written = written.strip().rstrip("/")
        written = written[:-len("/__init__.py")] if written.endswith("/__init__.py") else written
        written = written[:-3] if written.endswith(".py") else written
        dotted = written.replace("/", ".")
        names.append(dotted if dotted == PACKAGE or dotted.startswith(PACKAGE + ".") else f"{PACKAGE}.{dotted}")
    return names


def read_layers(readme: str) -> list[list[str]]:
    """The README's layer table, top layer first: each row's module prefixes (column 2)."""
    layers = [_module_names(row[1]) for row in _table_rows(_section(readme, LAYERS_HEADING)) if len(row) > 1]
    if not layers:
        raise ValueError(f"README's {LAYERS_HEADING!r} section has no table rows")
    return layers


def read_exceptions(readme: str) -> dict[tuple[str, str], str]:
    """``{(importer, imported): reason}`` from the README's exceptions table; a row without a reason is refused."""
    try:
        rows = _table_rows(_section(readme, EXCEPTIONS_HEADING))
    except ValueError:
        return {}
    allowed = {}
    for row in rows:
        if len(row) < 3 or not row[2] or row[2] in ("-", "—"):
            raise ValueError(f"layer exception {row} has no reason written")
        (source,), (target,) = _module_names(row[0]), _module_names(row[1])
        allowed[(source, target)] = row[2]
    return allowed


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the row whose longest prefix covers ``module`` (0 = top), None if no row does."""
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            covers = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def check(src: Path = REPO / "src", readme_path: Path = REPO / "README.md") -> list[str]:
    """Every problem found, one line each (empty when the code keeps its layers)."""
    readme = readme_path.read_text(encoding="utf-8")
    layers, allowed = read_layers(readme), read_exceptions(readme)
    modules = module_files(src)
    edges = import_graph(src)
    problems = [f"{module}: no row of the README's layer table covers it"
                for module in modules if layer_of(module, layers) is None]
    used_rows = {layer_of(module, layers) for module in modules}
    problems += [f"layer table row {', '.join(prefixes)}: covers no module"
                 for index, prefixes in enumerate(layers) if index not in used_rows]
    for edge in sorted(set(edges), key=lambda e: (e.source, e.line, e.target)):
        source, target = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if source is None or target is None or target >= source or (edge.source, edge.target) in allowed:
            continue
        where = "inside a function" if edge.in_function else "at module level"
        problems.append(f"arrow up: {modules[edge.source].relative_to(src.parent)}:{edge.line} {edge.source} -> "
                        f"{edge.target} ({where})")
    problems += [f"cycle: {' -> '.join(component)}" for component in cycles(edges)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", action="store_true", help="also print every internal import")
    args = parser.parse_args(argv)
    if args.graph:
        for edge in sorted(set(import_graph(REPO / "src")), key=lambda e: (e.source, e.line)):
            print(f"{edge.source}:{edge.line} -> {edge.target}{' (in function)' if edge.in_function else ''}")
    problems = check()
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
