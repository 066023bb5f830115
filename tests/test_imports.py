"""The import graph of the mtpdiag package, read from the source with ast (imports
inside functions included): no cycle, and the report stays a reader of the
on-disk schema that never reaches the trainer or the experiment."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtpdiag"


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, known) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its body.

    ``from P import x`` is an import of the submodule ``P.x`` where there is one, else
    of ``P`` itself; relative imports resolve against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` imports the deepest module that exists (a dotted name may end in an attribute)
                parts = alias.name.split(".")
                deepest = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known),
                               None)
                if deepest is not None:
                    targets.add(deepest)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    targets.add(submodule)
                elif base in known:
                    targets.add(base)
    targets.discard(name)
    return targets


def import_graph(package: Path) -> dict[str, set[str]]:
    found = modules(package)
    return {name: imported_modules(name, path, found) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module
    (Tarjan's components; a breadth-first search inside each for the cycle)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        start = min(component)
        paths, queue = {start: [start]}, [start]
        while queue:  # breadth first, so the cycle found back to start is a shortest one
            node = queue.pop(0)
            if start in graph[node]:
                found.append(paths[node] + [start])
                break
            for successor in sorted(graph[node] & component):
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    queue.append(successor)
    return sorted(found)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for successor in graph[node] - seen:
            seen.add(successor)
            todo.append(successor)
    return seen


def test_the_walker_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from .sub import b\nA = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def late():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a\nfrom pkg.sub.b import late\n")
    (package / "d.py").write_text("from . import A\nimport numpy\n")
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub"] == set()
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a", "pkg.sub.b"}
    assert graph["pkg.d"] == {"pkg"}  # a name of the package's __init__, not a submodule
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_the_report_reaches_neither_the_trainer_nor_the_experiment():
    """The report reads what the trainer wrote through mtpdiag.schema: importing it
    pulls in no trainer, experiment or command line (which import the report)."""
    graph = import_graph(PACKAGE)
    reached = reachable(graph, "mtpdiag.report")
    assert {"mtpdiag.schema", "mtpdiag.regimes", "mtpdiag.diagnostics.quantities"} <= reached
    assert not reached & {"mtpdiag.train", "mtpdiag.experiment", "mtpdiag.cli"}, sorted(reached)


@pytest.mark.parametrize("module", ["mtpdiag.report.claims", "mtpdiag.report.claims.base"])
def test_claims_import_no_plotting(module):
    """The claims are statistics: they share names with the figures through the schema, not through figures.py."""
    assert not reachable(import_graph(PACKAGE), module) & {"mtpdiag.report.figures", "mtpdiag.report.style"}
